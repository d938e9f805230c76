"""Library notices that say nothing to a user stay off the console: lm-eval's git probe (``fatal: not a git
repository``, once per depth and seed outside a checkout), Accelerate's "Removed shared tensor" on every save of
the tied embedding and transformers' "Loading weights" bar on every model load."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_BUNDLE = Path(__file__).resolve().parents[2] / "shared" / "eval_bundle"
PARCAE = str(Path(sys.executable).parent / "parcae")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def test_lm_eval_git_probe_prints_nothing_outside_a_checkout(tmp_path, capfd, monkeypatch):
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    from modeling_parcae.eval.quiet import silence_lm_eval_git_probe

    monkeypatch.chdir(tmp_path)
    # lm-eval's own probe, from where it is defined: an earlier test in this process may have silenced the evaluator's
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lm_eval.loggers.utils.get_git_commit_hash)
    lm_eval.evaluator.get_git_commit_hash()
    assert "not a git repository" in capfd.readouterr().err  # the probe this replaces
    silence_lm_eval_git_probe()
    assert lm_eval.evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""


@pytest.mark.skipif(not SHARED_BUNDLE.is_dir(), reason=f"needs the eval bundle at {SHARED_BUNDLE}")
def test_parcae_eval_outside_a_checkout_prints_no_git_error(tmp_path):
    result = subprocess.run([PARCAE, "eval", "--model", "demo", "--tasks", "copa", "--limit", "2", "--seeds",
                             "1234,2345", "--num-loops", "1,2", "--bundle", str(SHARED_BUNDLE), "--output",
                             "out.json"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not a git repository" not in result.stderr + result.stdout


def test_training_checkpoints_print_no_shared_tensor_notice(tmp_path):
    result = subprocess.run([PARCAE, "train", "tiny-cpu", "training.max_steps=2", "checkpoint.every_steps=1",
                             "eval.every_steps=100", "eval.depths=[1]"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny-cpu" / "checkpoints" / "step-00000002").is_dir()
    assert "Removed shared tensor" not in result.stderr + result.stdout


def test_parcae_generate_draws_no_loading_weights_bar_and_keeps_the_hub_download_bars(tmp_path):
    """Issue 36: every command that loads a model printed transformers' "Loading weights" progress bar. Hidden in the
    command only (the library's default is untouched); the Hub's download bars, which transformers' switch also turns
    off, are turned back on."""
    probe = ("import sys; from huggingface_hub.utils import are_progress_bars_disabled; "
             "from modeling_parcae.cli import main; code = main(sys.argv[1:]); "
             "print('hub bars disabled:', are_progress_bars_disabled()); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe, "generate", "--max-new-tokens", "2", "ROMEO:"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loading weights" not in result.stderr
    assert "hub bars disabled: False" in result.stdout
