"""bench/train_bench.py: micro-batch per shape, and a shape out of device memory is run again at half the
micro-batch of the stage that ran out, or listed as not measured (exit status 1): never left out silently."""
from __future__ import annotations

import types

import pytest
import torch

from bench import train_bench as TB


def test_micro_batch_per_shape():
    assert TB.micro_for("0", "3b", 32) == 32 and TB.micro_for("", "1b", 64) == 64
    assert TB.micro_for("128", "3b", 32) == 128
    assert TB.micro_for("1b=256,3b=128", "3b", 32) == 128 and TB.micro_for("1b=256", "3b", 32) == 32
    with pytest.raises(SystemExit, match="SHAPE=N"):
        TB.micro_for("7b=64", "1b", 64)


def fake_bench(limit: dict[str, int], calls: list):
    """_bench_shape that runs out of memory while a stage's micro-batch exceeds its limit."""

    def run(shape, args, dist, micro_of, held):
        calls.append(dict(micro_of))
        for stage in ("student", "online"):
            held["stage"] = stage
            if micro_of[stage] > limit[stage]:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 9 GiB ({stage})")
        return [{"shape": shape, **{f"micro_{k}": m for k, m in micro_of.items()}}]

    return run


def test_out_of_memory_halves_the_stage_that_ran_out_and_prints_the_micro_used(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(TB, "_bench_shape", fake_bench({"student": 128, "online": 16}, calls))
    args = types.SimpleNamespace(micro_batch="1b=256,3b=256", online_micro_batch="0", global_batch=256,
                                 on_oom="halve")
    dist = types.SimpleNamespace(world_size=1, is_main=True)
    rows, why = TB.measure_shape("3b", args, dist)
    assert why == "" and rows == [{"shape": "3b", "micro_student": 128, "micro_online": 16}]
    assert calls == [{"student": 256, "online": 16}, {"student": 128, "online": 16}]   # online untouched
    out = capsys.readouterr().out
    assert "out of memory at student micro 256" in out
    assert "shape=3b: micro-batch student 128, online 16 (asked for 256 / 16: halved after out of memory)" in out


def test_a_shape_that_cannot_run_is_listed_and_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(TB, "_bench_shape", fake_bench({"student": 0, "online": 0}, []))
    monkeypatch.setattr(TB.E, "init_distributed", lambda: types.SimpleNamespace(world_size=1, is_main=True,
                                                                                  device=torch.device("cpu")))
    monkeypatch.setattr(TB, "report", lambda *a, **k: None)
    assert TB.main(["--shape", "tiny", "--on-oom", "skip"]) == 1
    assert "NOT MEASURED shape=tiny: out of memory at student micro 4" in capsys.readouterr().out
    assert TB.main(["--shape", "tiny", "--global-batch", "8"]) == 1        # halving down to 0 does not fit
    out = capsys.readouterr().out
    assert "running it again at student micro 2" in out and "NOT MEASURED shape=tiny" in out
