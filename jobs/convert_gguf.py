"""Turn a GGUF checkpoint into a plain Hugging Face folder (config, tokenizer, safetensors) that every job loads
by path, so that a matrix of runs dequantises the GGUF once instead of once per process.

Usage:
    python -m jobs.convert_gguf models/smollm2_gguf SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m --dtype bfloat16

The weights are what transformers dequantises from the GGUF (for a Q4_1 file: a 4-bit approximation of the
original model, cast to --dtype). Writes into OUT.tmp and renames it to OUT at the end; an existing OUT is left
alone (delete it to convert again). Needs the `gguf` package.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("jobs.convert_gguf")


def convert(src_dir: str | Path, gguf_file: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, out = Path(src_dir), Path(out)
    if (out / "config.json").exists():
        log.info("%s exists; not converting again", out)
        return out
    if not (src_dir / gguf_file).is_file():
        raise FileNotFoundError(f"{src_dir / gguf_file} not found: pass the folder holding the .gguf and its name")
    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=gguf_file)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model = model.to(torch_dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: %s, %.1fM parameters in %s", out, type(model).__name__, n / 1e6, dtype)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.convert_gguf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src_dir", help="folder holding the .gguf file")
    ap.add_argument("gguf_file", help="file name of the .gguf inside src_dir")
    ap.add_argument("out", help="output folder (plain Hugging Face layout)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        convert(args.src_dir, args.gguf_file, args.out, args.dtype)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
