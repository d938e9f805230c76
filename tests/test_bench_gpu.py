"""The GPU benchmark's ``--smoke`` mode runs every section at toy shapes on CPU, so the script cannot rot between
GPU runs. What it checks beyond "it runs": the rows exist and the recompile counts it reports behave."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


def test_smoke_run_writes_every_row(tmp_path):
    output = tmp_path / "gpu_smoke.json"
    env = {key: value for key, value in os.environ.items() if key != "PARCAE_OFFICIAL_SRC"}
    result = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--out", str(output)],
                            cwd=REPO_ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["smoke"] and report["bf16_matmul_peak_tflop_per_s"] > 0
    assert "PARCAE_OFFICIAL_SRC" in report["official_skipped"]
    training = report["training"]["rows"]
    assert set(training) == {"ours eager", "ours torch.compile(model)", "ours compiled blocks, eager loss",
                             "ours compiled", "ours compiled, chunked loss"}
    assert all(row["ms_per_step"] > 0 and 0 < row["fraction_of_bf16_peak"] for row in training.values())
    prefill = report["inference"]["prefill"]
    assert prefill["ours compiled (regional)"]["graphs_compiled"] > 0
    assert prefill["ours compiled (regional)"]["graphs_compiled_at_other_loops"] == 0
    assert prefill["llama compiled (whole model)"]["graphs_compiled_at_other_loops"] > 0  # a new unrolled depth
    decode = report["inference"]["decode"]["ours compiled (regional)"]
    assert decode["graphs_timed_run"] == decode["graphs_at_other_loops"] == 0


@pytest.mark.skipif(not os.environ.get("PARCAE_OFFICIAL_SRC"),
                    reason="PARCAE_OFFICIAL_SRC is not set (an extracted checkout of the official sandyresearch/parcae "
                           "source): the official rows of the GPU benchmark are not smoke-run")
def test_smoke_run_with_the_official_class_writes_its_rows_and_both_baselines(tmp_path):
    output = tmp_path / "gpu_smoke.json"
    result = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--sections", "training",
                             "--out", str(output)], cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    training = json.loads(output.read_text())["training"]
    official_rows = {"official eager", "official compiled", "official blocks compiled"}
    assert official_rows <= set(training["rows"])
    assert all(training["rows"][name]["ms_per_step"] > 0 for name in official_rows)
    for baseline in ("official compiled", "official blocks compiled"):
        assert training[f"ours compiled / {baseline}"]["time"] > 0


def test_official_recipe_settings_stay_in_the_official_rows(monkeypatch):
    """The official rows run under its training recipe's process-wide settings (TF32, SDPA backends, inductor and
    dynamo config); our rows, measured before them and in the inference section after, must not inherit them."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench_gpu

    def settings():
        return (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.math_sdp_enabled(),
                torch._inductor.config.emulate_precision_casts, torch._functorch.config.donated_buffer,
                torch._dynamo.config.cache_size_limit)

    before = settings()
    with bench_gpu.official_recipe():
        inside = settings()
    assert inside == ("high", True, True, False, True, False, 64)
    assert settings() == before != inside
