"""Installed users name the bundled files (`demo`, `parcae path ...`) instead of finding them in site-packages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import modeling_parcae
from modeling_parcae.bundled import model_path_or_name, named_file

PARCAE = str(Path(sys.executable).parent / "parcae")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def parcae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PARCAE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_demo_model_path_is_public_and_loads():
    path = modeling_parcae.demo_model_path()
    model = modeling_parcae.ParcaeForCausalLM.from_pretrained(path)
    assert model.config.hidden_size == 192 and (path / "tokenizer.json").is_file()


def test_parcae_path_prints_each_bundled_file_from_any_directory(tmp_path):
    demo = parcae("path", "demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert Path(demo.stdout.strip()) == modeling_parcae.demo_model_path()
    tasks = Path(parcae("path", "tasks", cwd=tmp_path).stdout.strip())
    assert (tasks / "core.yaml").is_file() and (tasks / "utils.py").is_file()
    for what, name in [("recipe", "tiny-cpu"), ("preset", "parcae-140m"), ("accelerate", "cpu-2proc")]:
        printed = parcae("path", what, name, cwd=tmp_path)
        assert printed.returncode == 0 and Path(printed.stdout.strip()).is_file(), printed.stderr


def test_unknown_bundled_name_lists_the_available_ones(tmp_path):
    result = parcae("path", "accelerate", "ddp-3gpu", cwd=tmp_path)
    assert result.returncode == 2
    assert "no bundled accelerate named 'ddp-3gpu'" in result.stderr and "cpu-2proc" in result.stderr
    with pytest.raises(FileNotFoundError, match="parcae-140m"):
        named_file("preset", "parcae-14m")


def test_demo_by_name_in_the_cli_and_a_local_folder_of_that_name_wins(tmp_path, monkeypatch):
    result = parcae("generate", "--model", "demo", "--max-new-tokens", "3", "ROMEO:", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tok/s" in result.stdout
    monkeypatch.chdir(tmp_path)
    assert model_path_or_name("demo") == str(modeling_parcae.demo_model_path())
    (tmp_path / "demo").mkdir()
    assert model_path_or_name("demo") == "demo"
