"""Nothing lost, nothing half-written: every directory and report the project writes appears complete or not at all,
a destination never swallows its source, leftovers of killed runs are cleaned, and a resumed run's metrics continue
the file instead of repeating steps."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import GOLDEN, tiny_model
from modeling_parcae.cli import main as parcae_main
from modeling_parcae.atomic import atomic_directory
from modeling_parcae.training.loop import truncate_metrics

OFFICIAL = GOLDEN / "released_style" / "official"
TOKENIZER = GOLDEN / "tokenizer"
DEAD_PID = 2**22 + 1  # above Linux's largest pid: no process can have it


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


@pytest.fixture
def official_copy(tmp_path) -> Path:
    source = tmp_path / "ckpt"
    shutil.copytree(OFFICIAL, source)
    return source


# ---------------------------------------------------------------------------------------------------------------
# parcae convert: the destination never overlaps the source
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("destination", [".", "hf", "nested/deeper"], ids=["same", "inside", "deeper-inside"])
def test_convert_refuses_a_destination_that_is_or_lies_inside_the_source(official_copy, capsys, destination):
    before = snapshot(official_copy)
    dst = official_copy / destination
    assert parcae_main(["convert", str(official_copy), str(dst), "--overwrite", "--tokenizer", str(TOKENIZER)]) == 2
    assert "the source" in capsys.readouterr().err
    assert snapshot(official_copy) == before  # not one byte changed, nothing added
    assert sorted(p.name for p in official_copy.iterdir()) == sorted(p.name for p in OFFICIAL.iterdir())


def test_convert_refuses_a_destination_that_contains_the_source(tmp_path, capsys):
    parent = tmp_path / "work"
    shutil.copytree(OFFICIAL, parent / "ckpt")
    before = snapshot(parent)
    assert parcae_main(["convert", str(parent / "ckpt"), str(parent), "--overwrite"]) == 2
    assert "contains the source" in capsys.readouterr().err
    assert snapshot(parent) == before


def test_convert_back_to_official_refuses_its_own_source(tmp_path, capsys):
    hf = tmp_path / "hf"
    assert parcae_main(["convert", str(OFFICIAL), str(hf), "--tokenizer", str(TOKENIZER)]) == 0
    before = snapshot(hf)
    assert parcae_main(["convert", str(hf), str(hf), "--to", "official", "--overwrite"]) == 2
    assert "is the source" in capsys.readouterr().err
    assert snapshot(hf) == before


# ---------------------------------------------------------------------------------------------------------------
# staging folders: cleaned after a crash, abandoned ones removed on the next write
# ---------------------------------------------------------------------------------------------------------------
def test_abandoned_staging_folders_of_dead_processes_are_removed_on_the_next_write(tmp_path):
    dead = tmp_path / f".out.partial-{DEAD_PID}-abc"
    retired = tmp_path / f".out.old-{DEAD_PID}"
    alive = tmp_path / f".out.partial-{os.getppid()}-xyz"  # a running process (pytest's parent) may still write
    other = tmp_path / f".other.partial-{DEAD_PID}-abc"  # belongs to another destination
    for folder in (dead, retired, alive, other):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"half")
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "done.txt").write_text("complete")
    assert (tmp_path / "out" / "done.txt").read_text() == "complete"
    assert not dead.exists() and not retired.exists()
    assert alive.exists() and other.exists()


def test_disk_full_during_conversion_leaves_no_destination(tmp_path, monkeypatch, capsys):
    """The safetensors writer fails half-way as on a full disk: exit 2, the error names the cause, no DST, no
    staging folder."""
    import transformers.modeling_utils

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    assert parcae_main(["convert", str(OFFICIAL), str(out / "dst"), "--tokenizer", str(TOKENIZER)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_truncated_safetensors_is_named_and_nothing_is_written(tmp_path, capsys):
    hf = tmp_path / "hf"
    assert parcae_main(["convert", str(OFFICIAL), str(hf), "--tokenizer", str(TOKENIZER)]) == 0
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert parcae_main(["convert", str(hf), str(tmp_path / "back"), "--to", "official"]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is truncated or corrupt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "back").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------------------
# parcae train: the final model, and metrics.jsonl after --resume
# ---------------------------------------------------------------------------------------------------------------
class _DyingTokenizer:
    """A tokenizer whose save is killed after the model files are written (what SIGKILL did to final/ before)."""

    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt("killed while saving the final model")


def test_final_model_appears_complete_or_not_at_all(tmp_path, accelerator):
    from transformers import AutoTokenizer

    from modeling_parcae.training.checkpoint import save_final_model

    model = accelerator.prepare(tiny_model())
    final = tmp_path / "final"
    with pytest.raises(KeyboardInterrupt):
        save_final_model(accelerator, model, _DyingTokenizer(), final)
    assert list(tmp_path.iterdir()) == []  # no final/, no half-written staging folder

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    save_final_model(accelerator, model, tokenizer, final)
    names = {path.name for path in final.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_parcae.py", "configuration_parcae.py",
            "tokenizer.json", "tokenizer_config.json"} <= names
    from modeling_parcae import ParcaeForCausalLM

    reloaded = ParcaeForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids, num_loops=3).logits, model(ids, num_loops=3).logits)


def test_metrics_are_truncated_to_the_checkpoint_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": step, "train/loss": 10.0 - step}) for step in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "train/lo')  # the kill cut the last record short
    truncate_metrics(path, step=4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]

    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        truncate_metrics(path, step=4)


def test_a_run_never_silently_restarts_over_existing_checkpoints(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step-00000004").mkdir(parents=True)
    assert parcae_main(["train", "tiny-cpu", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "already holds checkpoints: pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


# ---------------------------------------------------------------------------------------------------------------
# parcae eval: reports are replaced atomically
# ---------------------------------------------------------------------------------------------------------------
def test_eval_report_is_replaced_atomically(tmp_path):
    from modeling_parcae.atomic import write_atomically

    report = tmp_path / "report.json"
    report.write_text('{"old": true}\n')

    def dies_half_way(path: Path):
        path.write_text('{"new": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(report, dies_half_way)
    assert report.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_next_training_run_cleans_what_a_killed_run_left_and_reports_validation(tmp_path):
    """A killed run left a half-written checkpoint temporary and a half-written final/ staging folder: the next run
    removes both, prints its validation loss on the console and writes a complete final model (tokenizer included)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    output = tmp_path / "run"
    (output / "checkpoints" / ".tmp-step-00000002").mkdir(parents=True)
    (output / "checkpoints" / ".tmp-step-00000002" / "model.safetensors").write_bytes(b"half")
    (output / f".final.partial-{DEAD_PID}-abc").mkdir()
    (output / f".final.partial-{DEAD_PID}-abc" / "modeling_parcae.py").write_text("# only the remote code")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "modeling_parcae.cli", "train", "tiny-cpu", f"output_dir={output}",
         "training.max_steps=2", "eval.every_steps=1", "eval.depths=[1,2]", "checkpoint.every_steps=100"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1 validation: loss@1 " in result.stdout and "step 2 validation: loss@1 " in result.stdout
    assert not (output / "checkpoints" / ".tmp-step-00000002").exists()
    assert not (output / f".final.partial-{DEAD_PID}-abc").exists()
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []
    final = {p.name for p in (output / "final").iterdir()}
    assert {"model.safetensors", "config.json", "modeling_parcae.py", "tokenizer.json", "tokenizer_config.json"} <= final
    config = json.loads((output / "final" / "tokenizer_config.json").read_text())
    assert config.get("eos_token") == "<|eos|>"


def test_trained_tokenizer_folder_is_complete_or_absent_and_never_replaced_silently(tmp_path, capsys):
    from conftest import EXCERPT

    output = tmp_path / "tok"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    args = ["train-tokenizer", "--data", str(EXCERPT), "--vocab-size", "300",
            "--output", str(output)]
    assert parcae_main(args) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["mine.txt"]
    assert parcae_main([*args, "--overwrite"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in output.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no staging folder left next to it
