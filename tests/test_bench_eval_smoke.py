"""``benchmarks/bench_eval.py official --smoke``: the GPU comparison with the official evaluator, on a tiny model on CPU.
Where ``PARCAE_OFFICIAL_SRC`` names the official source the official evaluator runs too, and every item must agree."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_official_comparison_smoke(bundle, tmp_path):
    report_path = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_eval.py"), "official", "--smoke",
                           "--bundle", str(bundle), "--workdir", str(tmp_path / "work"), "--output", str(report_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["tasks_scored"] == 3
    assert report["median_seconds"]["wall"]["parcae_eval"] > 0
    if not os.environ.get("PARCAE_OFFICIAL_SRC"):
        assert "PARCAE_OFFICIAL_SRC" in report["official_skipped"]
        pytest.skip("PARCAE_OFFICIAL_SRC is not set: ran our side only")
    assert report["same_tasks"] and report["same_accuracies"]
    assert report["items"]["items_compared"] == 3 * 5
    assert report["items"]["items_differing"] == 0, report["items"]["differing"]
    assert report["ours_core"] == pytest.approx(report["official_core"], abs=1e-4)
