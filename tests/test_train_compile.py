"""`parcae train --compile`: the compiled-block recipe runs, matches eager, resumes, and runs under DDP and FSDP2.

The runs are subprocesses of the real CLI on the tiny recipe. They compile with the ``aot_eager`` backend
(``training.compile_backend``): dynamo capture and AOTAutograd's joint forward/backward graphs, which is what the
distributed wrappers and checkpoints interact with, without inductor's C++ build of every graph, which would add
about 30 s per process on 2 cores. Inductor's numerics are checked in-process by tests/test_compilation.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

STEPS = 4
OVERRIDES = [f"training.max_steps={STEPS}", "training.global_batch_size=8", "checkpoint.every_steps=2",
             f"eval.every_steps={STEPS}", "eval.depths=[1,4]", "training.compile_backend=aot_eager"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
ACCELERATE = Path(sys.executable).parent / "accelerate"
COMPILING = "compiling each block and the loss (aot_eager)"
# aot_eager runs the traced aten ops (per-step losses equal eager's exactly on this machine); the margin covers
# AOTAutograd decompositions that regroup a reduction on other CPUs or torch releases
LOSS_TOLERANCE = 1e-4
# DDP's all-reduce and FSDP's reduce-scatter sum gradients in different orders (as in tests/test_fsdp.py)
DISTRIBUTED_TOLERANCE = 2e-3


def train(output: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["modeling_parcae.cli", "train", "tiny-cpu",
                                                      f"output_dir={output}", *OVERRIDES, *extra]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def accelerate(config: str) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(REPO_ROOT / "configuration" / "accelerate" / config), "-m"]


def records(output: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compiled") / "run"
    # without a GPU, bf16 asked for is said to fall back to fp32 (the eager run's precision, which the tests compare)
    gpu = torch.cuda.is_available()
    result = train(output, "--compile", *([] if gpu else ["--dtype", "bf16"]))
    assert COMPILING in result.stdout + result.stderr
    assert gpu or "training.mixed_precision=bf16 needs a bf16-capable GPU: training in float32" in result.stdout
    return output


def test_compiled_run_matches_the_eager_run(compiled_run, tmp_path):
    eager = tmp_path / "eager"
    result = train(eager, "--no-compile")
    assert COMPILING not in result.stdout + result.stderr
    compiled, reference = records(compiled_run), records(eager)
    assert sorted(compiled) == list(range(1, STEPS + 1))
    for step in reference:
        assert compiled[step]["train/depth"] == reference[step]["train/depth"]  # the same sampled depths
        assert abs(compiled[step]["train/loss"] - reference[step]["train/loss"]) < LOSS_TOLERANCE, step
    assert len({r["train/depth"] for r in reference.values()}) > 1  # several depths, one set of graphs
    for depth in (1, 4):
        assert abs(compiled[STEPS][f"val/loss@{depth}"] - reference[STEPS][f"val/loss@{depth}"]) < LOSS_TOLERANCE


def test_compiled_run_resumes_from_its_checkpoint(compiled_run, tmp_path):
    output = tmp_path / "resumed"
    shutil.copytree(compiled_run / "checkpoints" / "step-00000002", output / "checkpoints" / "step-00000002")
    result = train(output, "--compile", "--resume")
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    resumed, expected = records(output), records(compiled_run)
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        for key in ("train/loss", "train/grad_norm", "train/depth"):
            assert resumed[step][key] == pytest.approx(expected[step][key], abs=1e-6), (step, key)


def test_compiled_run_under_two_process_ddp_and_fsdp2(tmp_path):
    runs = {}
    for name, config in (("ddp", "cpu-2proc.yaml"), ("fsdp", "fsdp-cpu-2proc.yaml")):
        runs[name] = tmp_path / name
        result = train(runs[name], "--compile", launcher=accelerate(config))
        assert result.stdout.count(COMPILING) + result.stderr.count(COMPILING) >= 1
        assert (runs[name] / "checkpoints" / f"step-{STEPS:08d}" / "random_states_1.pkl").exists()  # 2 processes
    assert (runs["fsdp"] / "checkpoints" / f"step-{STEPS:08d}" / "pytorch_model_fsdp_0").is_dir()  # sharded
    ddp, fsdp = records(runs["ddp"]), records(runs["fsdp"])
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    for step in ddp:
        assert abs(ddp[step]["train/loss"] - fsdp[step]["train/loss"]) < DISTRIBUTED_TOLERANCE, step
    assert ddp[1]["train/loss"] - ddp[STEPS]["train/loss"] > 0.3  # it trains
