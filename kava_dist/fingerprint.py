"""Cache fingerprint: a hash of exactly the config fields and files that change the teacher targets.

Usage:
    from kava_dist.fingerprint import cache_fingerprint
    digest, fields = cache_fingerprint(cfg)     # fields: {"model.name_or_path": ..., "data.train_sha": ..., ...}

Loss weights, LoRA of the student, learning rate, T, seeds of training etc. are *not* in it, so every loss sweep
reuses one store. In it: teacher backbone (name, revision, GGUF file, a hash of its weight files), teacher
adapter (content hash), tokenizer (vocab hash), training data (content hash), prompt format, M, every eviction
field, the teacher compute dtype, the stored precision, and `targets.code`: a hash of the code that defines the
targets (`targets_code_version`: kava_dist/eviction.py and teacher.py whole, the field schema and target
computation of kava_dist/targets.py, and the q/k/v projections and RoPE of kava_dist/models/llama.py, which every
family uses; comments, docstrings and formatting do not count), so a changed rule never
reuses a store built by the old one. The store records `fields`, so a mismatch names them.
"""
from __future__ import annotations

import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from kava_dist.config import KavaConfig

FORMAT_VERSION = 1   # bump when the targets change through code that TARGET_CODE does not cover
_BIG = 64 << 20
CODE_FIELD = "targets.code"
# The code that defines the targets, under kava_dist/: a whole module (()) or named top-level definitions
# ("Class.method" for a method). Its hash is the fingerprint's `targets.code`.
TARGET_CODE = {
    "eviction.py": (),
    "teacher.py": (),
    "targets.py": ("TargetField", "FIELDS", "logical_dtype", "Targets", "compute_targets", "store_spec",
                   "TeacherTargets._batch"),
    "models/llama.py": ("apply_rope", "projections"),    # the q/k/v the teacher's hooks capture, its RoPE
}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _definition(tree: ast.Module, dotted: str, where: str) -> ast.AST:
    nodes: list = tree.body
    found = None
    for name in dotted.split("."):
        found = next((n for n in nodes if getattr(n, "name", None) == name or any(
            isinstance(t, ast.Name) and t.id == name for t in getattr(n, "targets", ()))), None)
        if found is None:
            raise LookupError(f"{where} has no {dotted}: update TARGET_CODE in kava_dist/fingerprint.py")
        nodes = getattr(found, "body", [])
    return found


@lru_cache(maxsize=4)
def targets_code_version(root: str | Path | None = None) -> str:
    """Hash of the code that defines the targets (TARGET_CODE, read from `root`, default this package's folder),
    without comments, docstrings or formatting."""
    h = hashlib.sha256()
    here = Path(root) if root else Path(__file__).resolve().parent
    for module, names in TARGET_CODE.items():
        tree = _strip_docstrings(ast.parse((here / module).read_text(), filename=module))
        for node in [tree] if not names else [_definition(tree, n, module) for n in names]:
            h.update(module.encode() + b"\0" + ast.unparse(node).encode() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _BIG:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:  # large weight files: size + head + tail + 16 evenly spaced 1 MB probes
            h.update(str(size).encode())
            for i in range(18):
                f.seek(min(size - (1 << 20), max(0, i * (size // 17))))
                h.update(f.read(1 << 20))
    return h.hexdigest()


def path_digest(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """Content hash of a file, or of a dir's files matching `patterns` (names + contents). '' if absent."""
    p = Path(path)
    if not str(path) or not p.exists():
        return ""
    files = [p] if p.is_file() else sorted({f for pat in patterns for f in p.rglob(pat) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(_file_digest(str(f), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def tokenizer_digest(cfg: KavaConfig) -> str:
    from kava_dist.backbone import load_tokenizer
    from kava_dist.prompts import add_special_tokens

    tok = load_tokenizer(cfg.model)
    add_special_tokens(tok)
    vocab = sorted(tok.get_vocab().items())
    payload = json.dumps([vocab, tok.bos_token, tok.eos_token, tok.pad_token], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_fingerprint_fields(cfg: KavaConfig) -> dict[str, object]:
    m, e, d = cfg.model, cfg.eviction, cfg.data
    weights = ("*.safetensors", "*.bin", "*.gguf", "config.json") if not m.gguf_file else (m.gguf_file,)
    local = Path(m.name_or_path).exists()
    return {
        "format_version": FORMAT_VERSION,
        "model.name_or_path": m.name_or_path if not local else Path(m.name_or_path).name,
        "model.revision": m.revision,
        "model.gguf_file": m.gguf_file,
        "model.weights_sha": path_digest(m.name_or_path, weights) if local else "",
        "model.dtype": m.dtype,
        "model.teacher_adapter_sha": path_digest(m.teacher_adapter, ("adapter_model.*", "adapter_config.json")),
        "tokenizer_sha": tokenizer_digest(cfg),
        "data.train_sha": path_digest(d.train_path),
        "data.cot_style": d.cot_style,
        "data.drop_last_step": d.drop_last_step,
        "data.answer_prompt": d.answer_prompt,
        "data.max_tokens": d.max_tokens,
        "data.numeric_answer": d.numeric_answer,
        "data.limit": d.limit,
        # only when set, so stores built before the field existed keep their fingerprint
        **({"data.answer_field": d.answer_field} if d.answer_field != "answer" else {}),
        **({"data.answer_spaces": False} if not d.answer_spaces else {}),
        "latent.num_latents": cfg.latent.num_latents,
        "eviction.method": e.method,
        "eviction.lam": e.lam,
        "eviction.order": e.order,
        "eviction.rope": e.rope,
        "eviction.gqa_pool": e.gqa_pool,
        "eviction.short_cot": e.short_cot,
        "eviction.seed": e.seed if e.method == "random" else 0,
        **({"eviction.share": e.share} if e.share != "none" else {}),   # absent = none: older stores still match
        "store.dtype": cfg.store.dtype,
        CODE_FIELD: targets_code_version(),
    }


def cache_fingerprint(cfg: KavaConfig) -> tuple[str, dict[str, object]]:
    fields = cache_fingerprint_fields(cfg)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return digest, fields


# content hashes of the fingerprint -> the config field naming the file (or dir) they hash
SOURCES = {"data.train_sha": "data.train_path", "model.weights_sha": "model.name_or_path",
           "model.teacher_adapter_sha": "model.teacher_adapter"}


def fingerprint_sources(cfg: KavaConfig) -> dict[str, str]:
    """The files behind the fingerprint's content hashes (absolute where they exist). The cache build records them
    in the store (meta/sources), so that a hash mismatch names the file the store was built from."""
    out = {}
    for field in SOURCES.values():
        section, key = field.split(".")
        value = str(getattr(getattr(cfg, section), key) or "")
        out[field] = str(Path(value).resolve()) if value and Path(value).exists() else value
    return out


def store_sources(get_meta) -> dict[str, str]:
    """meta/sources of a store (`get_meta` of its reader or writer); stores built before it was recorded: the paths
    of the config the build kept (meta/config, as given on that command line)."""
    src = get_meta("sources", None)
    if src:
        return dict(src)
    cfg = get_meta("config", None) or {}
    return {f: str((cfg.get(f.split(".")[0]) or {}).get(f.split(".")[1]) or "") for f in SOURCES.values()}


def diff_fields(a: dict, b: dict, sources_a: dict | None = None, sources_b: dict | None = None) -> list[str]:
    """Human-readable differences between two fingerprint field dicts (a = the store's, b = the config's). With
    the files behind both (fingerprint_sources / store_sources), a content-hash difference names them."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) == b.get(k):
            continue
        src = SOURCES.get(k)
        if src and sources_a is not None and sources_b is not None:
            out.append(f"{k}: store built from {sources_a.get(src) or '?'} (sha {a.get(k) or '-'}), config reads "
                       f"{sources_b.get(src) or '?'} (sha {b.get(k) or '-'})")
        else:
            out.append(f"{k}: {a.get(k)!r} != {b.get(k)!r}")
    return out
