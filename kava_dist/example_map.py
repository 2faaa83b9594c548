"""The example map of a run: which training examples it draws from (data order) and, for the student stage, the
store row of each. Every checkpoint records it; `--resume` refuses a run whose map changed (a store finished or
rebuilt between the kill and the resume, another data file), since later steps would draw other examples.

Usage:
    m = ExampleMap.of([e.id for e in items], rows)          # rows: None for stages without a store
    m.save(ckpt_dir)                                        # example_map.json (counts + sha256) + example_map.npz
    m.check_resume(run_dir)                                 # Refusal naming what changed, vs checkpoints/latest
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kava_dist.guard import Refusal, confine, disk_full, write_text

log = logging.getLogger(__name__)

NAME = "example_map"


@dataclass(frozen=True)
class ExampleMap:
    ids: np.ndarray
    rows: np.ndarray | None

    @classmethod
    def of(cls, ids, rows=None) -> ExampleMap:
        return cls(np.asarray(ids, np.int64), None if rows is None else np.asarray(rows, np.int64))

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self.ids.tobytes())
        if self.rows is not None:
            h.update(b"rows" + self.rows.tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        return {"examples": int(len(self.ids)), "with_store_rows": self.rows is not None, "sha256": self.sha256}

    def save(self, ckpt_dir: str | Path) -> None:
        d = Path(ckpt_dir)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"ids": self.ids} if self.rows is None else {"ids": self.ids, "rows": self.rows}
        try:
            np.savez(d / f"{NAME}.npz", **arrays)
        except OSError as e:
            (d / f"{NAME}.npz").unlink(missing_ok=True)
            raise disk_full(e, d) or e
        write_text(d / f"{NAME}.json", json.dumps(self.summary(), indent=1))

    @classmethod
    def load(cls, ckpt_dir: str | Path) -> ExampleMap | None:
        p = Path(ckpt_dir) / f"{NAME}.npz"
        if not p.exists():
            return None
        with np.load(p) as z:
            return cls.of(z["ids"], z["rows"] if "rows" in z else None)

    def diff(self, saved: ExampleMap) -> str:
        """'' if equal, else what changed (counts, example ids gained/lost, rows moved)."""
        if saved.sha256 == self.sha256:
            return ""
        a, b = set(saved.ids.tolist()), set(self.ids.tolist())
        parts = [f"examples {len(saved.ids)} -> {len(self.ids)}"]
        if b - a:
            parts.append(f"now present: ids {sorted(b - a)[:8]}{' ...' if len(b - a) > 8 else ''} ({len(b - a)})")
        if a - b:
            parts.append(f"now absent: ids {sorted(a - b)[:8]}{' ...' if len(a - b) > 8 else ''} ({len(a - b)})")
        if not (b - a) and not (a - b):
            if not np.array_equal(saved.ids, self.ids):
                parts.append("same examples in another order")
            elif saved.rows is not None and self.rows is not None:
                moved = int((saved.rows != self.rows).sum())
                parts.append(f"{moved} examples moved to other store rows")
        return "; ".join(parts)

    def check_resume(self, run_dir: str | Path) -> None:
        ckpt = Path(run_dir) / "checkpoints"
        latest = ckpt / "latest"
        if not latest.exists():
            return   # load_checkpoint names the missing checkpoint
        tag = latest.read_text().strip()
        saved = ExampleMap.load(confine(ckpt, tag, "checkpoint tag"))
        if saved is None:
            log.warning("%s records no example map (older checkpoint): resuming without checking it", ckpt / tag)
            return
        change = self.diff(saved)
        if change:
            raise Refusal(f"cannot resume {ckpt / tag}: the training examples changed since it was written ({change}); "
                          "later steps would draw other examples. Restore the store/data the run used, or start a "
                          "new train.out_dir.")
