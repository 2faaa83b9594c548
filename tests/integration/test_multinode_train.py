"""Training across nodes, simulated on one host (CPU, gloo on 127.0.0.1):

- a train.out_dir the ranks do not all see is refused at start (`check_shared_out_dir`): two gloo ranks, each
  given its own directory, as two nodes with node-local disks would be; one shared directory passes;
- a run checkpointed at world size 2 (two processes under the `deepspeed` launcher) resumes at world size 1
  through a DeepSpeed universal checkpoint (test_multinode_s3_train.py checks its curve and examples); when the
  conversion fails (here: a truncated optimizer partition) the resume is refused with one line, rc 2, naming the
  conversion command, before DeepSpeed loads (whose own refusal is a ZeRORuntimeException traceback).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kava_testing import free_port

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
DS = str(Path(sys.executable).with_name("deepspeed"))


def _rank(rank: int, world: int, port: int, dirs: list[str], result: str) -> None:
    import torch.distributed as tdist

    from kava_dist.engine import check_shared_out_dir
    from kava_dist.guard import Refusal

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check_shared_out_dir(Path(dirs[rank]))
        out = "ok"
    except Refusal as e:
        out = str(e)
    Path(f"{result}.{rank}").write_text(out)
    tdist.destroy_process_group()


def _check(tmp_path: Path, dirs: list[str]) -> list[str]:
    import torch.multiprocessing as mp

    result = str(tmp_path / "result")
    mp.start_processes(_rank, args=(2, free_port(), dirs, result), nprocs=2, join=True, start_method="spawn")
    return [Path(f"{result}.{r}").read_text() for r in range(2)]


@pytest.mark.timeout(120)
def test_out_dir_not_shared_between_ranks_is_refused(tmp_path):
    node_a, node_b = tmp_path / "node_a" / "run", tmp_path / "node_b" / "run"   # one path, two disks
    res = _check(tmp_path, [str(node_a), str(node_b)])
    assert "ok" not in res                                # every rank refuses (naming its own path)
    assert res[1] == res[0].replace(str(node_a), str(node_b))
    assert "not shared between the ranks" in res[0] and "rank 1 on" in res[0] and "rank 0 on" not in res[0]
    assert "docs/CLUSTER.md" in res[0] and "\n" not in res[0]
    assert not list(node_a.iterdir())                     # the probe file is removed
    shared = tmp_path / "shared"
    assert _check(tmp_path, [str(shared), str(shared)]) == ["ok", "ok"]
    assert not list(shared.iterdir())


def _env(threads: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    return env


def _run(cmd: list[str], log: Path, timeout: int = 240) -> tuple[int, str]:
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=str(ROOT), env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, log.read_text()


@pytest.mark.timeout(300)
def test_resume_at_another_world_size_converts_or_refuses_in_one_line(tmp_path):
    from kava_dist.tiny import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    rng = random.Random(0)
    with open(tmp_path / "data.jsonl", "w") as f:
        for _ in range(16):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"question": f"What is {a} + {b}?", "cot": f"<<{a}+{b}={a + b}>>",
                                "answer": str(a + b)}) + "\n")
    out = tmp_path / "run"
    common = ["--config", "configs/tiny_cpu.yaml", f"model.name_or_path={ckpt}", f"data.train_path={tmp_path / 'data.jsonl'}",
              "latent.num_latents=2", "train.global_batch=4", "train.micro_batch=2", "train.zero_stage=2",
              "train.stage=teacher", "train.max_steps=2", f"train.out_dir={out}"]
    rc, text = _run([DS, "--num_gpus", "2", "--master_port", str(free_port()), "jobs/train.py", *common,
                     "train.stop_at_step=1"], tmp_path / "ds2.log")
    assert rc == 0, text[-3000:]
    tag = out / "checkpoints" / "global_step1"
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step1"
    backup = tmp_path / "backup"
    shutil.copytree(out, backup)
    part = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[:100])                 # a partition the conversion cannot read
    rc, text = _run([PY, "-m", "jobs.train", *common, "--resume"], tmp_path / "resume1_bad.log")
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert rc == 2, text[-3000:]
    assert len(errors) == 1 and "written by 2 processes, this run has 1" in errors[0], text[-3000:]
    assert "Resume with 2 processes" in errors[0] and "deepspeed.checkpoint.ds_to_universal" in errors[0]
    assert "Traceback" not in text and "ZeRORuntimeException" not in text
    assert not (out / "checkpoints" / "global_step1_universal").exists()      # no half conversion left
    shutil.rmtree(out)
    shutil.copytree(backup, out)
    rc, text = _run([PY, "-m", "jobs.train", *common, "--resume"], tmp_path / "resume1.log")
    assert rc == 0, text[-3000:]
    assert "from global_step1_universal (written by 2 processes, resharded to 1)" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step2"
