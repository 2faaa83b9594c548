"""[1] Prompts: load question/CoT/answer rows and turn them into teacher and student token segments.

Usage:
    from kava_dist.prompts import load_examples, add_special_tokens, encode_examples, collate
    examples, report = load_examples("gsm8k_aug.valid.jsonl.gz", cot_style="auto")
    special = add_special_tokens(tokenizer)            # <bot>, <eot>, <latent> (+ [PAD] if missing)
    encoded, report = encode_examples(examples, tokenizer, answer_prompt="The answer is:", max_tokens=256, report=report)
    batch = collate(encoded[:8], pad_id=special.pad)   # segment-aligned tensors, see `Batch`

Formats read (through `datasets`): .jsonl / .json / .jsonl.gz / .parquet files, `save_to_disk` dirs, and iCoT
`.txt` files (`question||cot #### answer`). Rows carry `question`, `answer` and either `cot` (a string) or `steps`
(a list, the `whynlp/gsm8k-aug` form). Sequences follow PCCoT and CODI (docs/DEVIATIONS.md D13-D14): no chat template, BOS +
question, CoT steps with the last one dropped, then "The answer is:" + answer (no leading space) + EOS. Malformed
rows are counted by reason in a `DataReport` and skipped, never fatal.
"""
from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

COT_JOINERS = {"equation": " ", "nl": " ", "plus": " + ", "lines": "\n"}
SPECIAL_TOKENS = {"bot": "<kava.bot>", "eot": "<kava.eot>", "latent": "<kava.latent>"}
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


@dataclass
class Example:
    id: int
    """Row index in the source file (stable: the file's hash is part of the cache fingerprint)."""
    question: str
    steps: list[str]
    answer: str
    cot_style: str = "equation"


@dataclass
class DataReport:
    source: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: dict[str, list[int]] = field(default_factory=dict)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    """Malformed lines (bad JSON, not an object): row id, file:line and the parse error (the first 1000)."""

    def skip(self, reason: str, row_id: int) -> None:
        self.skipped[reason] += 1
        ids = self.skipped_ids.setdefault(reason, [])
        if len(ids) < 20:
            ids.append(row_id)

    def malformed(self, row_id: int, where: str) -> None:
        self.skip(MALFORMED, row_id)
        if len(self.quarantined) < 1000:
            self.quarantined.append({"id": row_id, "where": where})

    def check_malformed(self, max_bad_fraction: float = 1.0) -> None:
        """Refuse the file when no row is usable, or when malformed lines exceed `max_bad_fraction` of its rows."""
        bad = self.skipped.get(MALFORMED, 0)
        if not bad:
            return
        first = "; ".join(q["where"] for q in self.quarantined[:3])
        if self.kept == 0 or bad / max(1, self.rows) > max_bad_fraction:
            raise ValueError(f"{self.source}: {bad} of {self.rows} lines are malformed (first: {first}); fix the file "
                             f"or raise data.max_bad_fraction (now {max_bad_fraction}) to skip them.")
        log.warning("%s: %d malformed lines skipped and quarantined in the data report (first: %s)", self.source,
                    bad, first)

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.source}: {self.rows} rows, {self.kept} kept, skipped ({parts})"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "kept": self.kept,
                "skipped": dict(self.skipped), "skipped_ids": self.skipped_ids, "quarantined": self.quarantined}


MALFORMED = "malformed line"
_MALFORMED_KEY = "__malformed__"


# ----------------------------------------------------------------------------- loading


def _read_icot_txt(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if "||" not in line or "####" not in line:
            rows.append({"question": None, "cot": None, "answer": None})
            continue
        question, rest = line.split("||", 1)
        cot, answer = rest.rsplit("####", 1)
        rows.append({"question": question.strip(), "cot": cot.strip(), "answer": answer.strip()})
    return rows


def check_data_file(path: str | Path) -> Path:
    """The data file's path, or FileNotFoundError naming the fix (cheap: callers check before loading a model)."""
    p = Path(path)
    if not str(path):
        raise FileNotFoundError("no data path given. Set data.train_path (or pass the dataset file by path).")
    if not p.exists():
        raise FileNotFoundError(
            f"data file {p} does not exist. Pass a .jsonl/.jsonl.gz/.parquet file or a datasets dir by path "
            f"(the full GSM8k-AUG train set is not bundled: fetch whynlp/gsm8k-aug or zen-E/GSM8k-Aug yourself).")
    return p


def _read_json_lines(p: Path) -> list[dict[str, Any]]:
    """JSON lines one by one: a line that is not a JSON object becomes a placeholder row naming file:line, so row
    ids (the index among non-blank lines, as `datasets` numbers them) stay those of the well-formed file."""
    rows: list[dict[str, Any]] = []
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except ValueError as e:
                row = {_MALFORMED_KEY: f"{p}:{lineno}: {str(e)[:120]}"}
            rows.append(row)
    return rows


def read_rows(path: str | Path):
    """Rows of a data file as a `datasets.Dataset` (or a list for iCoT .txt / JSON lines with malformed lines).
    Errors name the fix."""
    import datasets

    p = check_data_file(path)
    datasets.disable_progress_bars()
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{p} is a DatasetDict with splits {list(ds)}; point at one split's dir.")
            ds = ds["train"]
        return ds
    name = p.name.lower()
    if name.endswith(".txt"):
        return _read_icot_txt(p)
    if name.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=str(p), split="train")
    if any(name.endswith(s) for s in (".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        try:
            return datasets.load_dataset("json", data_files=str(p), split="train")
        except Exception as e:  # noqa: BLE001 - one bad line (or mixed types) fails the whole arrow load
            opener = gzip.open if name.endswith(".gz") else open
            with opener(p, "rt", encoding="utf-8", errors="replace") as f:
                head = f.read(4096).lstrip()
            if head.startswith("["):
                raise ValueError(f"{p} is not valid JSON ({str(e).splitlines()[0][:200]}); fix the file.") from e
            log.warning("%s: not loadable as a whole (%s); reading it line by line", p, str(e).splitlines()[0][:160])
            return _read_json_lines(p)
    raise ValueError(f"unknown data format for {p}: use .jsonl, .jsonl.gz, .json, .parquet, .txt (iCoT) or a datasets dir.")


def detect_cot_style(cot: str) -> str:
    if "<<" in cot and ">>" in cot:
        return "equation"
    if " + " in cot and re.fullmatch(r"[\d\s+()]+", cot):
        return "plus"
    return "nl"


def split_steps(cot: str, style: str) -> list[str]:
    """Split a CoT string into steps (docs/DEVIATIONS.md D14): equations, sentences (CODI's '. '), ' + ' or lines."""
    cot = cot.strip()
    if not cot:
        return []
    if style == "equation":
        steps = re.findall(r"<<[^<>]*>>", cot)
        return steps or cot.split()
    if style == "nl":
        parts = [s.strip() for s in cot.split(". ") if s.strip()]
        if len(parts) == 1:  # sentences whose periods were lost (newlines collapsed): split before capitals
            parts = [s.strip() for s in re.split(r"(?<=[a-z0-9%$)]) (?=[A-Z][a-z])", cot) if s.strip()]
            return parts
        return [s if s.endswith(".") else s + "." for s in parts[:-1]] + parts[-1:]
    if style == "plus":
        return [s.strip() for s in cot.split(" + ") if s.strip()]
    if style == "lines":
        return [s.strip() for s in cot.splitlines() if s.strip()]
    raise ValueError(f"unknown cot_style {style!r}; use auto, equation, nl, plus or lines.")


def normalize_answer(answer: Any) -> str:
    return str(answer).strip().replace(",", "")


def load_examples(path: str | Path, cot_style: str = "auto", numeric_answer: bool = True,
                  limit: int = 0, answer_field: str = "answer",
                  answer_spaces: bool = True) -> tuple[list[Example], DataReport]:
    """Load rows as `Example`s, skipping (and counting) malformed ones. The answer is read from
    `answer_field` (e.g. answer_icot); a file without that field is an error that lists the fields it has.
    `answer_spaces=False` removes the whitespace inside each answer (data.answer_spaces)."""
    rows = read_rows(path)
    report = DataReport(source=str(path))
    examples = []
    n = len(rows) if not limit else min(limit, len(rows))
    if answer_field != "answer" and n:
        names = list(getattr(rows, "column_names", None) or rows[0].keys())
        if answer_field not in names:
            raise ValueError(f"{path} has no field {answer_field!r} (data.answer_field); its rows have "
                             f"{', '.join(names)}. Set data.answer_field to one of them.")
    for i in range(n):
        row = rows[i]
        report.rows += 1
        if _MALFORMED_KEY in row:
            report.malformed(i, row[_MALFORMED_KEY])
            continue
        question, answer = row.get("question"), row.get(answer_field)
        if not isinstance(question, str) or not question.strip():
            report.skip("empty or missing question", i)
            continue
        if answer is None or normalize_answer(answer) == "":
            report.skip("missing answer", i)
            continue
        answer = normalize_answer(answer)
        if not answer_spaces:
            answer = "".join(answer.split())
        if numeric_answer and not _NUMBER.fullmatch(answer):
            report.skip("non-numeric answer", i)
            continue
        if isinstance(row.get("steps"), list):
            steps = [str(s).strip() for s in row["steps"] if str(s).strip()]
            style = cot_style if cot_style != "auto" else detect_cot_style(" ".join(steps))
        else:
            cot = row.get("cot")
            if cot is None:
                cot = ""
            if not isinstance(cot, str):
                report.skip("cot is not a string", i)
                continue
            style = cot_style if cot_style != "auto" else detect_cot_style(cot)
            steps = split_steps(cot, style)
        question = question.strip().replace("  ", " ")
        examples.append(Example(id=i, question=question, steps=steps, answer=answer, cot_style=style))
        report.kept += 1
    report.check_malformed()
    log.info(report.summary())
    return examples, report


# ----------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class SpecialIds:
    bot: int
    eot: int
    latent: int
    pad: int
    eos: int
    bos: int | None

    @property
    def new_token_ids(self) -> list[int]:
        return [self.bot, self.eot, self.latent, self.pad]


def add_special_tokens(tokenizer) -> SpecialIds:
    """Add <bot>, <eot>, <latent> (and [PAD] if the tokenizer has none); idempotent. Resize the model after."""
    missing = [t for t in SPECIAL_TOKENS.values() if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token_id is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before training.")
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    return SpecialIds(bot=ids["bot"], eot=ids["eot"], latent=ids["latent"], pad=tokenizer.pad_token_id,
                      eos=tokenizer.eos_token_id, bos=tokenizer.bos_token_id)


@dataclass
class Encoded:
    id: int
    question_ids: list[int]
    """BOS (if the tokenizer has one) + question."""
    cot_ids: list[int]
    """CoT steps (last one dropped unless configured otherwise), joined in the style's separator."""
    prompt_ids: list[int]
    """The forced answer prompt ("The answer is:")."""
    answer_ids: list[int]
    """Answer digits + EOS."""

    @property
    def teacher_len(self) -> int:
        return len(self.question_ids) + len(self.cot_ids) + len(self.prompt_ids) + len(self.answer_ids)


def _tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_examples(examples: Sequence[Example], tokenizer, answer_prompt: str = "The answer is:",
                    drop_last_step: bool = True, max_tokens: int = 0,
                    report: DataReport | None = None) -> tuple[list[Encoded], DataReport]:
    """Tokenise examples into segments; drop (and count) those longer than `max_tokens` (0 = no limit)."""
    report = report or DataReport(source="<examples>", rows=len(examples), kept=len(examples))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = _tok(tokenizer, answer_prompt)
    out = []
    for ex in examples:
        steps = ex.steps[:-1] if drop_last_step else ex.steps
        cot_text = COT_JOINERS.get(ex.cot_style, " ").join(steps)
        enc = Encoded(id=ex.id, question_ids=bos + _tok(tokenizer, ex.question), cot_ids=_tok(tokenizer, cot_text),
                      prompt_ids=list(prompt_ids), answer_ids=_tok(tokenizer, ex.answer) + [tokenizer.eos_token_id])
        if max_tokens and enc.teacher_len > max_tokens:
            report.skip(f"longer than data.max_tokens={max_tokens}", ex.id)
            report.kept -= 1
            continue
        out.append(enc)
    return out, report


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Segment-aligned batch. Question left-padded, CoT and answer segments right-padded, so every segment
    starts at the same column for all rows: teacher = [q | cot | ans], student = [q | <bot> latents <eot> | ans]."""

    ids: torch.Tensor        # [B] example ids
    q_ids: torch.Tensor      # [B, Q] BOS + question, left-padded
    q_mask: torch.Tensor     # [B, Q] bool
    cot_ids: torch.Tensor    # [B, C] right-padded (C may be 0)
    cot_mask: torch.Tensor   # [B, C] bool
    ans_ids: torch.Tensor    # [B, A] prompt + answer + EOS, right-padded
    ans_mask: torch.Tensor   # [B, A] bool
    prompt_len: int          # tokens of the answer prompt (same for every row)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return Batch(**moved)

    def pin_memory(self) -> "Batch":
        """A copy in page-locked host memory, so `.to(cuda, non_blocking=True)` does not stall the host."""
        return Batch(**{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens of the teacher sequences."""
        return int(self.q_mask.sum() + self.cot_mask.sum() + self.ans_mask.sum())


def load_examples_for(path: str | Path, data, limit: int = 0,
                      numeric: bool | None = None) -> tuple[list[Example], DataReport]:
    """`load_examples` with every `DataConfig` reading setting (CoT style, answer field and form, numeric check):
    the one place a new data setting is wired, for training, validation, evaluation and probes alike. `numeric`
    overrides `data.numeric_answer` (evaluation keeps rows its scoring can read: `data.answer_match`)."""
    numeric = data.numeric_answer if numeric is None else numeric
    return load_examples(path, cot_style=data.cot_style, numeric_answer=numeric, limit=limit,
                         answer_field=data.answer_field, answer_spaces=data.answer_spaces)


def load_training_set(data, tokenizer) -> tuple[list[Encoded], DataReport]:
    """`data.train_path` loaded and encoded with every `DataConfig` setting (style, answer prompt, last-step drop,
    length limit, row limit): the one definition of "the training examples" that the trainer, the cache build
    and its benchmark share, so a store's rows and a run's examples cannot drift apart."""
    examples, report = load_examples_for(data.train_path, data, data.limit)
    report.check_malformed(data.max_bad_fraction)
    return encode_examples(examples, tokenizer, data.answer_prompt, data.drop_last_step, data.max_tokens, report)


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = True
    return ids, mask


def collate(encoded: Sequence[Encoded], pad_id: int) -> Batch:
    if not encoded:
        raise ValueError("collate got an empty list of examples.")
    prompt_lens = {len(e.prompt_ids) for e in encoded}
    if len(prompt_lens) != 1:
        raise ValueError("all examples in a batch must share one answer prompt.")
    q_ids, q_mask = _pad([e.question_ids for e in encoded], pad_id, left=True)
    cot_ids, cot_mask = _pad([e.cot_ids for e in encoded], pad_id, left=False)
    ans_ids, ans_mask = _pad([e.prompt_ids + e.answer_ids for e in encoded], pad_id, left=False)
    return Batch(ids=torch.tensor([e.id for e in encoded], dtype=torch.long), q_ids=q_ids, q_mask=q_mask,
                 cot_ids=cot_ids, cot_mask=cot_mask, ans_ids=ans_ids, ans_mask=ans_mask,
                 prompt_len=prompt_lens.pop())
