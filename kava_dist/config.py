"""One typed config tree for every kava job, loaded from YAML with dotted CLI overrides.

Usage:
    from kava_dist.config import load_config
    cfg = load_config("configs/paper/llama1b_aug.yaml", ["loss.alpha_kv=2", "train.lr=5e-4"])
    cfg.loss.alpha_kv            # 2.0
    save_config(cfg, run_dir / "config.yaml")   # the resolved config, saved with every run

Precedence: CLI overrides > YAML file (and the files it `inherit:`s) > dataclass defaults.
Every field carries a docstring (the string literal under it); `python -m jobs.train --help-config`
prints them. Errors name the field and the fix. `cache_fingerprint` lives in `kava_dist.fingerprint`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Backbone: a Hugging Face hub name or a local checkpoint dir (teacher and student share it)."""
    gguf_file: str = ""
    """GGUF file name inside `name_or_path` (loaded with transformers `gguf_file=`); empty for safetensors."""
    revision: str = ""
    """Hub revision (commit) of the backbone; part of the cache fingerprint."""
    dtype: str = "bfloat16"
    """Compute dtype of the backbone: bfloat16 | float32 | float16."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa | eager | flash_attention_2."""
    sdpa_backends: list[str] = field(default_factory=lambda: ["flash", "efficient", "math"])
    """PyTorch SDPA kernels allowed, process-wide (flash | efficient | cudnn | math; empty = torch's default set).
    cuDNN is left out by default: torch picks it first for masked attention on Hopper/Blackwell and it builds a
    new plan (~0.3-1 s) for every unseen batch shape, which variable-length batches hit all the time."""
    fused_kernels: str = "auto"
    """How the student's passes run in training (kava_dist.fused): compile | eager | hf | auto (= compile on CUDA
    with train.zero_stage 0-2, hf otherwise). compile: each decoder layer as one torch.compile'd graph (fused
    norms, RoPE, SiLU x up, residuals, LoRA dropout and scale; masked GQA without K/V repeats); eager: the same
    function uncompiled; hf: the HF/peft modules as they are. Same arithmetic in all; not under ZeRO-3."""
    teacher_adapter: str = ""
    """peft adapter dir of the CoT-fine-tuned teacher (output of `train.stage=teacher`); empty = base model."""
    student_init_adapter: str = ""
    """Initialise the trained weights (LoRA/projection/new tokens) of a student, online or nocot run from this
    adapter dir, e.g. the teacher's (empty = fresh LoRA on the base model)."""


@dataclass
class LoraSettings:
    enabled: bool = True
    """Train LoRA adapters; false = full fine-tuning of every weight (e.g. the demo's from-scratch teacher)."""
    r: int = 128
    """LoRA rank (paper: 128)."""
    alpha: int = 32
    """LoRA alpha (paper: 32)."""
    dropout: float = 0.1
    """LoRA dropout (paper: 0.1)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules that get LoRA (docs/DEVIATIONS.md D11: q/k/v/o; CODI/PCCoT also add gate/up/down_proj)."""
    train_new_tokens: bool = True
    """Make the embeddings of the added special tokens (<bot>, <eot>, <latent>, pad) trainable."""


@dataclass
class LatentConfig:
    num_latents: int = 24
    """M: continuous latent tokens the student reasons in (= teacher cache budget)."""
    num_iterations: int = 3
    """T: PCCoT Jacobi iterations over the M latents (>= 1; T >= M equals the sequential rollout)."""
    use_projection: bool = True
    """Map last-layer hidden states to latent inputs through Linear-GELU-Linear-LayerNorm (off = identity)."""
    projection_dropout: float = 0.0
    """Dropout in front of the projection MLP (CODI uses one; PCCoT does not)."""
    fix_masks: bool = True
    """Pass correct attention masks and position ids in the Jacobi passes (PCCoT omits them; deviation D2)."""
    soft_tokens: bool = False
    """Latent input = the expected next-token embedding softmax(lm_head(h)) @ E plus gate * prj(h), the gate a
    trained scalar starting at 0 (DEVIATIONS.md D28; off = the paper's prj(h)). A student from CoT-trained weights
    then starts by Jacobi-decoding its chain as soft tokens, whose K/V the teacher's are. Needs use_projection."""
    cot_curriculum_steps: int = 0
    """A CoT curriculum (DEVIATIONS.md D26; 0 = off, the paper): during the first N optimizer steps the student
    also writes the teacher's CoT between <eot> and the answer prompt, minus its first r tokens, r growing
    linearly from 0 to the longest CoT; the latents take over what is removed. KV and CODI targets unchanged."""


@dataclass
class EvictionConfig:
    method: str = "rkv"
    """Teacher cache compression: rkv | attention | redundancy | crop | random."""
    lam: float = 0.1
    """R-KV mix: S = lam * importance + (1 - lam) * redundancy (rkv only)."""
    order: str = "position"
    """Order of the kept entries in the M slots: position (ascending CoT position) | score."""
    rope: str = "post"
    """Keys matched post-RoPE (as in the HF cache) or pre-RoPE (k_proj output): post | pre."""
    gqa_pool: str = "max"
    """One importance score per KV head: max over the query group of the logits (R-KV) | mean of softmaxes."""
    short_cot: str = "mask"
    """When N_C < M: mask the extra slots out of the loss (mask) or regress them to zero (zero_target)."""
    seed: int = 0
    """Seed of the `random` eviction method."""
    share: str = "none"
    """Which heads one kept set serves: none (each layer and KV head keeps its own CoT positions, R-KV) | heads
    (a layer's KV heads share the positions of their mean score) | all (every layer and head: each latent slot
    then stands for one CoT token everywhere)."""


@dataclass
class LossConfig:
    student_ce: float = 1.0
    """Weight of the student's answer cross-entropy."""
    teacher_ce: float = 1.0
    """Weight of the teacher's CoT+answer cross-entropy in the online stage (the paper's joint training)."""
    offline_teacher_ce: float = 0.0
    """Weight of a CoT+answer CE on the student's own weights in the student stage (costs a teacher-length pass)."""
    alpha_codi: float = 10.0
    """alpha1: weight of the CODI hidden-state distillation at the distillation token."""
    alpha_kv: float = 1.0
    """alpha2: weight of the KV-matching loss against the compressed teacher cache."""
    kv_loss: str = "smooth_l1"
    """Element-wise KV loss: smooth_l1 | mse | l1."""
    kv_std: str = "layer"
    """Normalise the KV loss by the detached teacher std: layer (per layer, K and V apart) | global | none."""
    codi_loss: str = "smooth_l1"
    """Element-wise CODI loss: smooth_l1 | mse | l1."""
    codi_std: str = "layer"
    """Normalise the CODI loss by the detached teacher std: layer | global | none."""


@dataclass
class DataConfig:
    train_path: str = ""
    """Training set: .jsonl / .jsonl.gz / .parquet file or a `datasets.save_to_disk` dir (question, cot|steps, answer)."""
    valid_path: str = ""
    """Optional validation set in the same schema."""
    cot_style: str = "auto"
    """How the CoT splits into steps: auto | equation (<<...>> blocks) | nl (sentences on '. ') | plus (' + ') | lines."""
    drop_last_step: bool = True
    """Drop the last CoT step from the teacher text (CODI/PCCoT default; the paper finds it critical)."""
    answer_prompt: str = "The answer is:"
    """Answer prompt forced before the answer in teacher and student sequences."""
    max_tokens: int = 256
    """Drop examples whose teacher sequence (BOS+question+CoT+prompt+answer+EOS) is longer (CODI: 200 AUG / 256 NL)."""
    numeric_answer: bool = True
    """Require a numeric answer (GSM8k-style); rows with other answers are counted and skipped."""
    answer_field: str = "answer"
    """Row field that holds the answer the models learn and are scored on (e.g. answer_icot: the product's digits
    least-significant first, as the iCoT multiplication sets give it)."""
    answer_spaces: bool = True
    """Keep the whitespace inside the answer. false writes it as one string without spaces (answer_icot's
    `8 5 6 8 7 2 1 2` becomes `85687212`): SmolLM2's tokenizer makes every space a token of its own, so
    a spaced digit answer costs two decoding passes per digit where iCoT's GPT-2 reads ` 5` as one (D29)."""
    answer_match: str = "numeric"
    """How a generated answer is scored: numeric (CODI: the last number after the answer prompt, compared as a
    float) | exact (the text after the answer prompt equals the answer, whitespace runs collapsed; for digit
    strings such as answer_icot, where the last number would be one digit)."""
    limit: int = 0
    """Use only the first N rows of the training file (0 = all)."""
    max_bad_fraction: float = 0.05
    """Refuse a data file when more than this fraction of its lines are malformed (bad JSON, wrong types); fewer are
    counted, quarantined with file and line in the data report, and skipped. A file with no usable row is always
    refused."""


@dataclass
class StoreConfig:
    path: str = ""
    """Teacher-target store: local dir or fsspec URL (s3://bucket/prefix)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for remote stores (endpoint_url, key, secret, client_kwargs)."""
    dtype: str = "bf16"
    """Stored precision of K/V targets: bf16 | fp16 | fp32 | int8 | int4 (int = KIVI-style quantised)."""
    shard_examples: int = 0
    """Examples per shard file (0 = size shards to ~128 MB)."""
    codec: str = "zstd"
    """Compression codec of a new store: zstd (default) | blosc-zstd | none. Plain zstd at level 1 stores the same
    bytes as blosc-zstd at level 1 for less write CPU and about 2x faster random reads (docs/CACHE_BUILD.md,
    "Where a shard write's time goes"). A store records its codec at creation and is always read with it; the
    codec is not in the fingerprint, so training reads a store of either codec. Adding shards to an existing
    store needs its codec: store.codec=blosc-zstd for a store built before zstd became the default."""
    clevel: int = 1
    """Compression level. 1 (default): ~2x less CPU per shard written than 3 for ~5% more bytes on bf16 K/V
    (1.30x vs 1.37x), which keeps the store write up with an H100 teacher (docs/PERFORMANCE.md, "Cache-build job
    vs bare teacher forward"); higher saves little."""
    verify: bool = False
    """Check each shard's checksum on first read during training."""
    allow_partial: bool = False
    """Train on an incomplete store (shards still missing): only the examples it holds, logged and recorded in the
    run's config. Default false: training refuses such a store, naming the missing shards. Not in the fingerprint
    (it selects rows of the same targets, it does not change them)."""
    cache_dir: str = ""
    """Training reads of a store on object storage (s3://... or any fsspec URL): a directory on the node's local
    disk (NVMe) where whole shard files are kept, one GET per file (checked against the sha256 the ledger
    records), then read locally; the files of upcoming micro-batches download ahead of use. Node-local and shared
    by the node's ranks (one download per host, through a lock file): give every rank of a node the same path.
    '' (default): off, ranged GETs straight from the store. Ignored for a local store. Not in the fingerprint."""
    cache_bytes: int = 0
    """Most bytes store.cache_dir may hold (least recently used files are evicted and fetched again when read).
    0 (default): unbounded; give it at least the store's size (`python -m cache_store info URL`) so each file is
    fetched once per run."""


@dataclass
class BuildConfig:
    batch_size: int = 32
    """Teacher forward batch size inside a shard."""
    num_actors: int = 0
    """Teacher actors (0 = one per GPU in the Ray cluster, or one on CPU)."""
    max_retries: int = 3
    """Times a failed shard is retried (a dead actor is replaced) before it is reported as failed."""
    cpus_per_actor: float = 1.0
    """CPUs each teacher actor reserves."""
    gpus_per_actor: float = 1.0
    """GPUs each teacher actor reserves when the cluster has GPUs (0 = run on CPU)."""
    ray_address: str = ""
    """Ray cluster to join ('' = $RAY_ADDRESS, as set by `ray job submit`, else a local Ray started here)."""
    object_store_mb: int = 0
    """Object store of a local Ray started by the job (0 = Ray's default, 30% of RAM)."""
    writers_per_actor: int = 0
    """Write actors (processes on the teacher's node) per teacher actor: they compress and write shards while the
    teacher computes, one shard at a time each (0 = 6 per GPU teacher, 1 per CPU teacher). Raise it when the
    build's steady rate trails the teacher and the node has spare cores (docs/PERFORMANCE.md, "Cache-build job vs
    bare teacher forward": an H100, 16 cores)."""
    writer_threads: int = 2
    """zarr codec threads in each write actor (0 = zarr's default, about the node's core count)."""
    cpus_per_writer: float = 0.0
    """Ray CPUs each write actor reserves (0: placed regardless of the teacher actors' CPU reservations)."""
    writes_in_flight: int = 0
    """Computed shards per teacher actor that may wait for or be in a write, held in Ray's object store
    (0 = 2 x writers_per_actor); the teacher pauses when this many are pending."""


@dataclass
class TrainConfig:
    stage: str = "student"
    """teacher (CoT fine-tune) | student (KaVa from a store) | online (paper's joint step) | nocot (answer only)."""
    out_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints, adapter, metrics.jsonl, TensorBoard, reports."""
    lr: float = 8e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    epochs: float = 10.0
    """Training epochs (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run (0 = derived from epochs)."""
    warmup_ratio: float = 0.03
    """Linear warmup as a fraction of the steps, then train.lr_schedule."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps; > 0 replaces warmup_ratio. Use it with train.time_limit_min,
    where the steps a run reaches are not known in advance and a ratio of max_steps may never finish warming up."""
    lr_schedule: str = "cosine"
    """After the warmup: cosine (decay to 0 at the last step) | constant (the peak lr to the end) | wsd (the peak,
    then a linear decay over the last train.lr_decay_steps steps). With train.time_limit_min, set train.max_steps
    to the steps the limit allows, or the decay is cut short."""
    lr_decay_steps: int = 0
    """wsd only: optimizer steps of the final linear decay (0 = a fifth of the steps after the warmup)."""
    time_limit_min: float = 0.0
    """Stop at the first optimizer step past this many minutes of training, then checkpoint and export as at the
    end of the run (0 = no limit). metrics.jsonl and the exported kava.json record the step and examples seen."""
    global_batch: int = 128
    """Examples per optimizer step over all ranks; accumulation = global / (micro * world), must divide."""
    micro_batch: int = 8
    """Examples per forward on one rank."""
    group_by_length: int = 1
    """Length-grouped batching, so less padding is computed. 1: each global batch keeps its examples, sorted by
    length before it is cut into micro-batches; N > 1: also groups global batches by length within megabatches of N
    global batches (HF's group_by_length; a sampling change, DEVIATIONS.md D23); 0: plain random micro-batches."""
    loader_switch_interval_ms: float = 0.0
    """While a store is read, Python's thread switch interval in ms (sys.setswitchinterval; restored afterwards).
    The loader's prefetch and decode threads wait up to this long for the GIL while the training thread runs
    Python; 0 keeps the interpreter's (5 ms). bench/gil_handoff_bench.py measures the effect on this machine."""
    loader_read_processes: int = -1
    """Read the store in this many worker processes per rank (cache_store.read_workers), so reads never wait for
    the training process's GIL; 0 reads on threads of the training process. Each worker reopens the store.
    -1 (auto): 4 on a CUDA device when the node has at least 8 CPU cores per local rank, else 0 (on CPU the
    training itself needs the cores)."""
    grad_clip: float = 2.0
    """Gradient-norm clip."""
    skip_nonfinite_steps: bool = False
    """bf16: let DeepSpeed skip an optimizer step whose gradients hold inf/NaN (its check_grad_overflow). The check
    makes the host wait for the GPU every step (docs/PERFORMANCE.md, "Fused student passes": the sync sites of a
    student step); off, a non-finite loss or gradient norm stops the run at the next log line, naming the last
    checkpoint to resume from."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0 | 1 | 2 | 3."""
    deepspeed_config: str = ""
    """Extra DeepSpeed JSON merged over the generated config (e.g. configs/deepspeed/zero3_offload.json)."""
    precision: str = "auto"
    """bf16 | fp32 | auto (bf16 on GPU, fp32 on CPU)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""
    eval_every: int = 0
    """Evaluate on data.valid_path every N steps (0 = never during training): the loss terms and, with
    eval.valid_questions > 0, exact accuracy by greedy decoding in the stage's mode (learning curves)."""
    resume: bool = False
    """Continue from the latest checkpoint in out_dir."""
    stop_at_step: int = 0
    """End this invocation after N optimizer steps with a checkpoint, schedule unchanged (0 = run to the end); resume later."""
    final_checkpoint: bool = True
    """Write a DeepSpeed checkpoint (weights + optimizer state) at the end of the run; false leaves only the
    exported adapter/ (a full fine-tune's optimizer state is ~14 bytes per parameter; such a run cannot be resumed
    or extended)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints in out_dir/checkpoints (0 = keep all)."""


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=list)
    """Evaluation sets: file paths in the shared schema (question, answer)."""
    batch_size: int = 64
    """Questions per batched greedy decode."""
    max_new_tokens: int = 16
    """Answer tokens generated after the forced prompt (CoT mode uses cot_max_new_tokens)."""
    cot_max_new_tokens: int = 256
    """Tokens the Full-CoT teacher may generate."""
    limit: int = 0
    """Evaluate the first N questions of each set (0 = all)."""
    valid_questions: int = 0
    """Questions of data.valid_path decoded every train.eval_every steps for the accuracy curve (0 = loss only)."""


@dataclass
class KavaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and adapters."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (Table 6: r=128, alpha=32, dropout 0.1, q/k/v/o)."""
    latent: LatentConfig = field(default_factory=LatentConfig)
    """Student latent reasoning (PCCoT)."""
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    """Teacher KV compression (R-KV variant)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data and sequence format."""
    store: StoreConfig = field(default_factory=StoreConfig)
    """Teacher-target store."""
    build: BuildConfig = field(default_factory=BuildConfig)
    """Cache build job (Ray)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop (DeepSpeed)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""


SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
FUSED_MODES = ("auto", "compile", "eager", "hf")

CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": ("bfloat16", "float32", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "eviction.method": ("rkv", "attention", "redundancy", "crop", "random"),
    "eviction.order": ("position", "score"),
    "eviction.rope": ("post", "pre"),
    "eviction.gqa_pool": ("max", "mean"),
    "eviction.short_cot": ("mask", "zero_target"),
    "eviction.share": ("none", "heads", "all"),
    "loss.kv_loss": ("smooth_l1", "mse", "l1"),
    "loss.kv_std": ("layer", "global", "none"),
    "loss.codi_loss": ("smooth_l1", "mse", "l1"),
    "loss.codi_std": ("layer", "global", "none"),
    "data.cot_style": ("auto", "equation", "nl", "plus", "lines"),
    "data.answer_match": ("numeric", "exact"),
    "store.dtype": ("bf16", "fp16", "fp32", "int8", "int4"),
    "store.codec": ("zstd", "blosc-zstd", "none"),
    "train.stage": ("teacher", "student", "online", "nocot"),
    "train.lr_schedule": ("cosine", "constant", "wsd"),
    "train.zero_stage": (0, 1, 2, 3),
    "train.precision": ("auto", "bf16", "fp32"),
}


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass (the string literal under each field)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def describe(cfg_cls: type = KavaConfig, prefix: str = "") -> str:
    """Every field with its default and docstring, one per line (for --help-config)."""
    lines = []
    docs = field_docs(cfg_cls)
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            lines.append(f"[{prefix}{f.name}] {docs.get(f.name, '')}")
            lines.append(describe(t, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {prefix}{f.name} = {default!r}: {docs.get(f.name, '')}")
    return "\n".join(lines)


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}. Write it as [a, b] in YAML or a,b on the CLI.")
        (inner,) = typing.get_args(typ) or (Any,)
        return [_coerce(v, inner, name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}. Write it as {{key: value}}.")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}.")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}.")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}.") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{name}: expected an integer, got {value!r}.")
        return out
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}.")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown config key {prefix}{key}.{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            sub = data[f.name] or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{prefix}{f.name}: expected a section (mapping), got {sub!r}.")
            kwargs[f.name] = _build(t, sub, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(data[f.name], t, prefix + f.name)
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, recursively for mappings on both sides (config inheritance, DeepSpeed overlays)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist. Pass an existing YAML file with --config.")
    if path in seen:
        raise ConfigError(f"config inheritance cycle through {path}.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}.")
    parents = data.pop("inherit", None)
    if parents:
        merged: dict = {}
        for p in [parents] if isinstance(parents, str) else parents:
            merged = deep_merge(merged, _read_yaml(path.parent / p, seen + (path,)))
        data = deep_merge(merged, data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`loss.alpha_kv=2` -> (["loss", "alpha_kv"], 2); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. loss.alpha_kv=2).")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.strip().startswith("{"):
        value = raw  # e.g. data.answer_prompt=Answer: (YAML would read a mapping)
    return key.split("."), value


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> KavaConfig:
    data = dict(data)
    for ov in overrides:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {})
            node = node[k]
        node[keys[-1]] = value
    cfg = _build(KavaConfig, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> KavaConfig:
    """Load YAML (with `inherit:`), apply dotted overrides, validate. `path=None` = defaults only."""
    data = _read_yaml(Path(path)) if path else {}
    return config_from_dict(data, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: KavaConfig, path: str | Path) -> None:
    """Write the resolved config with credentials redacted (kava_dist.guard.redact); temp file + rename."""
    from kava_dist.guard import redact, write_text

    write_text(path, yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))


def get_field(cfg: Any, dotted: str) -> Any:
    node = cfg
    for k in dotted.split("."):
        node = getattr(node, k)
    return node


def validate(cfg: KavaConfig) -> None:
    """Raise ConfigError naming the field and the fix for any invalid value."""
    for name, allowed in CHOICES.items():
        value = get_field(cfg, name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}.{hint}")
    positive = ["latent.num_latents", "latent.num_iterations", "lora.r", "train.global_batch", "train.log_every",
                "train.micro_batch", "build.batch_size", "eval.batch_size", "eval.max_new_tokens", "data.max_tokens"]
    for name in positive:
        if get_field(cfg, name) < 1:
            raise ConfigError(f"{name}={get_field(cfg, name)} must be >= 1.")
    nonneg = ["build.writers_per_actor", "build.writes_in_flight", "build.writer_threads", "build.cpus_per_writer", "loss.student_ce", "loss.teacher_ce", "loss.offline_teacher_ce", "loss.alpha_codi", "loss.alpha_kv", "train.lr",
              "train.weight_decay", "train.grad_clip", "train.max_steps", "train.epochs", "data.limit", "eval.limit",
              "train.stop_at_step", "train.keep_checkpoints", "train.save_every", "train.eval_every",
              "train.group_by_length", "train.time_limit_min", "train.loader_switch_interval_ms", "train.warmup_steps",
              "train.lr_decay_steps", "eval.valid_questions",
              "latent.cot_curriculum_steps", "store.cache_bytes"]
    for name in nonneg:
        if get_field(cfg, name) < 0:
            raise ConfigError(f"{name}={get_field(cfg, name)} must be >= 0.")
    if cfg.store.cache_bytes and not cfg.store.cache_dir:
        raise ConfigError(f"store.cache_bytes={cfg.store.cache_bytes} but store.cache_dir is empty: set "
                          "store.cache_dir to a directory on the node's local disk (e.g. /local_nvme/kava-cache), or "
                          "drop store.cache_bytes.")
    if not 0.0 <= cfg.eviction.lam <= 1.0:
        raise ConfigError(f"eviction.lam={cfg.eviction.lam} must be in [0, 1] (0 = redundancy only, 1 = attention only).")
    if not 0.0 <= cfg.lora.dropout < 1.0 or not 0.0 <= cfg.latent.projection_dropout < 1.0:
        raise ConfigError("lora.dropout and latent.projection_dropout must be in [0, 1).")
    if cfg.latent.soft_tokens and not cfg.latent.use_projection:
        raise ConfigError("latent.soft_tokens=true needs latent.use_projection=true (its gate lives in the projection).")
    if cfg.train.loader_read_processes < -1:
        raise ConfigError(f"train.loader_read_processes={cfg.train.loader_read_processes}: use -1 (auto), 0 (threads "
                          "of the training process) or N >= 1 worker processes per rank.")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio={cfg.train.warmup_ratio} must be in [0, 1).")
    if cfg.train.global_batch % cfg.train.micro_batch:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not a multiple of train.micro_batch="
            f"{cfg.train.micro_batch}. Set train.micro_batch to a divisor of the global batch.")
    bad = [b for b in cfg.model.sdpa_backends if b not in SDPA_BACKENDS]
    if bad:
        raise ConfigError(f"model.sdpa_backends has {bad}; choose from {', '.join(SDPA_BACKENDS)} (or [] for torch's "
                          "default set), e.g. model.sdpa_backends=[flash,efficient,math].")
    if cfg.model.fused_kernels not in FUSED_MODES:
        raise ConfigError(f"model.fused_kernels={cfg.model.fused_kernels!r}; choose one of {', '.join(FUSED_MODES)}.")
    if cfg.model.fused_kernels in ("compile", "eager") and cfg.train.zero_stage == 3:
        raise ConfigError(f"model.fused_kernels={cfg.model.fused_kernels} cannot run under train.zero_stage=3 (its "
                          "parameter gathering hooks cannot run inside the fused layer). Set model.fused_kernels=auto "
                          "or hf, or use train.zero_stage=2.")
    if not cfg.data.answer_field.strip():
        raise ConfigError("data.answer_field is empty. Name the row field that holds the answer (default answer).")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1].")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules is empty. List modules (e.g. [q_proj, k_proj, v_proj, o_proj]) or set lora.enabled=false.")
