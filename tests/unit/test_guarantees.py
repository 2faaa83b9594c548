"""What kava guarantees on failure paths (docs/GUARANTEES.md), at unit level: malformed data lines are quarantined
with file:line, secrets never reach written files, names stay under their root, a changed example map refuses a
resume, a full disk is named."""
from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from kava_dist.guard import Refusal, confine, disk_full, redact, redact_argv, write_text

GOOD = {"question": "Tom has 3 apples and gets 4. How many?", "cot": "<<3+4=7>> <<7*1=7>>", "answer": "7"}


def _lines(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_malformed_json_line_is_quarantined_with_file_and_line(tmp_path: Path, gz: bool) -> None:
    from kava_dist.prompts import load_examples

    rows = [GOOD] * 30 + ['{"question": "broken", "answer": '] + [GOOD] * 9
    p = _lines(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), rows, gz)
    exs, rep = load_examples(p)
    assert len(exs) == 39 and rep.rows == 40 and rep.skipped["malformed line"] == 1
    assert rep.quarantined == [{"id": 30, "where": rep.quarantined[0]["where"]}]
    assert rep.quarantined[0]["where"].startswith(f"{p}:31:")
    assert [e.id for e in exs][29:31] == [29, 31]     # ids stay the line's row index


def test_wrong_types_are_counted_not_fatal(tmp_path: Path) -> None:
    from kava_dist.prompts import load_examples

    rows = [GOOD] * 20 + [{"question": 5, "cot": ["x"], "answer": {"a": 1}}, [1, 2], {**GOOD, "cot": 3}]
    exs, rep = load_examples(_lines(tmp_path / "d.jsonl", rows))
    assert len(exs) == 20 and rep.rows == 23
    assert rep.skipped["malformed line"] == 1 and "not an object" in rep.quarantined[0]["where"]
    assert sum(rep.skipped.values()) == 3


def test_too_many_malformed_lines_refuse_naming_the_file(tmp_path: Path) -> None:
    from kava_dist.config import load_config
    from kava_dist.prompts import load_examples, load_training_set

    p = _lines(tmp_path / "d.jsonl", [GOOD] * 8 + ["not json"] * 2)
    cfg = load_config(None, [f"data.train_path={p}"])
    with pytest.raises(ValueError, match=r"2 of 10 lines are malformed .*d.jsonl:9.*data.max_bad_fraction"):
        load_training_set(cfg.data, tokenizer=None)
    with pytest.raises(ValueError, match="malformed"):
        load_examples(_lines(tmp_path / "bad.jsonl", ["{", "nope"]))      # no usable row at all


def test_redact_masks_credentials_everywhere_but_keeps_other_fields() -> None:
    cfg = {"store": {"path": "s3://b/p", "storage_options": {"key": "AKIA1", "secret": "S3CR3T", "token": "T0K",
                                                             "endpoint_url": "http://x",
                                                             "client_kwargs": {"aws_session_token": "T1"}}},
           "data": {"max_tokens": 256}, "model": {"hf_token": "hf_x", "db_password": "pw", "tokenizer": "t"}}
    out = json.dumps(redact(cfg))
    for secret in ("AKIA1", "S3CR3T", "T0K", "T1", "hf_x", "pw"):
        assert secret not in out
    assert '"max_tokens": 256' in out and "http://x" in out and '"tokenizer": "t"' in out
    argv = redact_argv(["--config", "c.yaml", "store.storage_options={key: AKIA1, secret: S3CR3T}", "loss.alpha_kv=2"])
    assert "AKIA1" not in " ".join(argv) and argv[-1] == "loss.alpha_kv=2"


def test_save_config_redacts_but_memory_keeps_credentials(tmp_path: Path) -> None:
    from kava_dist.config import load_config, save_config

    cfg = load_config(None, ["store.storage_options={key: AKIA1, secret: S3CR3T}"])
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "AKIA1" not in text and "S3CR3T" not in text
    assert yaml.safe_load(text)["store"]["storage_options"]["key"] == "***"
    assert cfg.store.storage_options["secret"] == "S3CR3T"          # still reaches fsspec at run time


def test_allow_partial_is_not_in_the_fingerprint(tiny_paths, tmp_path: Path) -> None:
    from kava_dist.config import load_config
    from kava_dist.fingerprint import cache_fingerprint

    base = [f"model.name_or_path={tiny_paths['llama']}", f"data.train_path={_lines(tmp_path / 'd.jsonl', [GOOD])}"]
    assert load_config(None, base).store.allow_partial is False
    assert cache_fingerprint(load_config(None, base)) == cache_fingerprint(
        load_config(None, base + ["store.allow_partial=true", "data.max_bad_fraction=0.5"]))


@pytest.mark.parametrize("name", ["../../esc/evil.json", "/etc/x.json", "a/../../b.json"])
def test_confine_refuses_names_outside_the_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(Refusal, match="outside"):
        confine(tmp_path / "eval", name, "dataset name")
    assert confine(tmp_path / "eval", "gsm8k.json", "dataset name") == tmp_path / "eval" / "gsm8k.json"


def test_evaluation_names_never_become_paths_outside_eval(tmp_path: Path) -> None:
    from kava_dist.evaluate import resolve_dataset, write_result

    (tmp_path / "esc").mkdir()
    (tmp_path / "esc" / "evil.test.jsonl.gz").write_bytes(b"")
    data_dir = tmp_path / "data" / "x"
    data_dir.mkdir(parents=True)
    name, path = resolve_dataset("../../esc/evil", data_dir)
    assert name == "evil" and path.exists()
    with pytest.raises(Refusal):
        write_result({"summary": {"dataset": "../../esc/evil"}}, tmp_path / "run" / "eval")
    assert not (tmp_path / "esc" / "evil.json").exists()


def test_example_map_refuses_a_changed_store(tmp_path: Path) -> None:
    from kava_dist.example_map import ExampleMap

    run = tmp_path / "run"
    old = ExampleMap.of([0, 1, 2, 5], [0, 1, 2, 3])
    old.save(run / "checkpoints" / "global_step2")
    (run / "checkpoints" / "latest").write_text("global_step2")
    old.check_resume(run)                                           # same map: fine
    with pytest.raises(Refusal, match=r"examples 4 -> 5; now present: ids \[3\]"):
        ExampleMap.of([0, 1, 2, 3, 5], [0, 1, 2, 3, 4]).check_resume(run)
    with pytest.raises(Refusal, match="moved to other store rows"):
        ExampleMap.of([0, 1, 2, 5], [1, 0, 2, 3]).check_resume(run)
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.raises(Refusal, match="checkpoint tag"):
        old.check_resume(run)


def test_full_disk_is_named_and_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(Refusal, match=f"disk full at {tmp_path / 'c.yaml'}"):
        write_text(tmp_path / "c.yaml", "x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    assert disk_full(RuntimeError("basic_ios::clear: iostream error"), tmp_path) is None   # plenty of space here
    assert isinstance(disk_full(OSError(errno.ENOSPC, "x"), tmp_path), Refusal)


def test_checkpoint_full_disk_is_named_and_the_partial_tag_removed(tmp_path: Path, monkeypatch) -> None:
    from kava_dist import engine as E
    from kava_dist.config import load_config

    class Engine:
        global_rank = 0

        def save_checkpoint(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(Refusal, match="disk full at .*global_step3"):
        E.save_checkpoint(Engine(), tmp_path, 3, load_config(None, []), {})
    assert not (tmp_path / "checkpoints" / "global_step3").exists()


def test_client_state_config_is_redacted(tmp_path: Path) -> None:
    from kava_dist import engine as E
    from kava_dist.config import load_config

    seen = {}

    class Engine:
        global_rank = 0

        def save_checkpoint(self, path, tag, client_state, **k):
            seen.update(client_state)

    E.save_checkpoint(Engine(), tmp_path, 1, load_config(None, ["store.storage_options={secret: S3CR3T}"]), {})
    assert "S3CR3T" not in json.dumps(seen["config"]) and np.isscalar(seen["step"])
    assert "S3CR3T" not in (tmp_path / "checkpoints" / "global_step1" / "config.yaml").read_text()
