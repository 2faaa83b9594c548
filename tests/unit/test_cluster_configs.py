"""The multi-node launcher files in configs/cluster/ (docs/CLUSTER.md) parse, and the shell ones pass the right
arguments to the `deepspeed` launcher (run with shims for srun/scontrol and a fake launcher that prints argv)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "configs" / "cluster"


def test_rayjob_manifest_is_a_rayjob_running_the_build():
    doc = yaml.safe_load((CLUSTER / "build_cache_rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "-m jobs.build_cache" in spec["entrypoint"] and "store.path=s3://" in spec["entrypoint"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers and workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def test_shell_launchers_parse():
    for name in ("train.sbatch", "train_hostfile.sh"):
        subprocess.run(["bash", "-n", str(CLUSTER / name)], check=True)


def _fake(tmp: Path) -> dict:
    """srun runs its command as node 1 of 2; scontrol lists two hosts; .venv/bin/deepspeed prints its argv."""
    bin_ = tmp / "bin"
    (tmp / "home" / ".venv" / "bin").mkdir(parents=True)
    bin_.mkdir()
    scripts = {bin_ / "srun": 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n',
               bin_ / "scontrol": "printf 'gpu-a\\ngpu-b\\n'\n",
               tmp / "home" / ".venv" / "bin" / "deepspeed": 'printf "%s\\n" "$@"\n'}
    for p, body in scripts.items():
        p.write_text("#!/usr/bin/env bash\n" + body)
        p.chmod(0o755)
    return os.environ | {"PATH": f"{bin_}:{os.environ['PATH']}", "KAVA_HOME": str(tmp / "home"),
                         "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "kava",
                         "SLURM_JOB_ID": "7", "OUT_DIR": str(tmp / "shared" / "run")}


def test_sbatch_runs_one_launcher_per_node_meeting_on_the_first(tmp_path):
    env = _fake(tmp_path)
    out = subprocess.run(["bash", str(CLUSTER / "train.sbatch"), "cfg.yaml", "loss.alpha_kv=2", "a b=c"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:2] == ["--no_ssh", "--num_nodes"] and out[2] == "2"
    assert out[out.index("--node_rank") + 1] == "1" and out[out.index("--master_addr") + 1] == "gpu-a"
    assert out[out.index("jobs/train.py"):] == ["jobs/train.py", "--config", "cfg.yaml",
                                                f"train.out_dir={tmp_path / 'shared' / 'run'}", "loss.alpha_kv=2",
                                                "a b=c"]
    (tmp_path / "shared" / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "shared" / "run" / "checkpoints" / "latest").write_text("global_step2")
    out = subprocess.run(["bash", str(CLUSTER / "train.sbatch"), "cfg.yaml"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[-1] == "--resume"                             # a requeued job continues its run


def test_hostfile_launcher_uses_pdsh_and_the_first_host(tmp_path):
    env = _fake(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# hosts\nnode1 slots=8\nnode2 slots=8\n")
    script = tmp_path / "home" / "configs" / "cluster" / "train_hostfile.sh"   # it runs from the repo root
    script.parent.mkdir(parents=True)
    script.write_text((CLUSTER / "train_hostfile.sh").read_text())
    out = subprocess.run(["bash", str(script), "cfg.yaml", "x=1"], env=env | {"HOSTFILE": str(hostfile)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[out.index("--hostfile") + 1] == str(hostfile) and out[out.index("--launcher") + 1] == "pdsh"
    assert out[out.index("--master_addr") + 1] == "node1"
    assert out[-3:] == ["cfg.yaml", f"train.out_dir={tmp_path / 'shared' / 'run'}", "x=1"]
