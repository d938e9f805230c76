"""A plain (non-editable) wheel gives a working package, CLI, presets and task files outside the checkout, and its
core install (no extras) loads the demo model and generates."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, site_packages_without_this_project
from packaging.requirements import Requirement


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel of this checkout installed into a fresh target dir, and an env that sees it but not the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO_ROOT)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("parcae_transformers-*.whl"))
    target = root / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # the dependencies come from this venv's site-packages, minus the editable install of the checkout
    shadow = site_packages_without_this_project(root / "site")
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{shadow}", "PYTHONNOUSERSITE": "1"}
    outside = root / "elsewhere"
    outside.mkdir()
    return dict(target=target, env=env, cwd=outside, wheel=wheel)


def run(installed, *args):
    return subprocess.run([sys.executable, "-S", *args], env=installed["env"], cwd=installed["cwd"],
                          capture_output=True, text=True, timeout=300)


def test_the_installed_package_is_not_the_checkout(installed):
    result = run(installed, "-c", "import modeling_parcae; print(modeling_parcae.__file__)")
    assert result.returncode == 0, result.stderr
    assert str(installed["target"]) in result.stdout and str(REPO_ROOT) not in result.stdout


def test_presets_and_subpackages_install_inside_the_namespace(installed):
    script = (
        "import modeling_parcae as m, modeling_parcae.conversion.key_map, modeling_parcae.eval;"
        "print(len(m.list_presets()), m.load_preset('parcae-140m').hidden_size)"
    )
    result = run(installed, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "768"]


def test_the_cli_runs_from_outside_the_checkout(installed):
    result = run(installed, "-m", "modeling_parcae.cli", "--help")
    assert result.returncode == 0, result.stderr
    for command in ("generate", "convert", "eval", "train"):
        assert command in result.stdout
    assert (installed["target"] / "bin" / "parcae").exists()


def test_eval_task_files_ship_in_the_wheel(installed):
    tasks = list((installed["target"] / "modeling_parcae" / "eval" / "tasks").rglob("*.yaml"))
    assert len(tasks) == len(list((REPO_ROOT / "eval" / "tasks").rglob("*.yaml"))) > 0


def test_bundled_recipe_finds_its_data_and_tokenizer_outside_the_checkout(installed):
    script = ("from modeling_parcae.training.recipe import load_recipe; import os; r = load_recipe('tiny-cpu'); "
              "print(r.data.path, r.tokenizer, os.path.isfile(r.data.path), os.path.isdir(r.tokenizer))")
    result = run(installed, "-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    data, tokenizer, *found = result.stdout.split()
    assert found == ["True", "True"]
    assert data.startswith(str(installed["target"])) and tokenizer.startswith(str(installed["target"]))


def test_the_wheel_carries_the_demo_model_and_generates_offline(installed):
    demo = installed["target"] / "modeling_parcae" / "demo"
    assert (demo / "model.safetensors").exists(), "the bundled demo model is not in the wheel"
    assert sum(f.stat().st_size for f in demo.iterdir()) <= 8 * 2**20
    assert installed["wheel"].stat().st_size <= 8 * 2**20
    env = {**installed["env"], "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-S", "-m", "modeling_parcae.cli", "generate", "--max-new-tokens", "8",
                             "ROMEO:"], env=env, cwd=installed["cwd"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.strip()) > len("ROMEO:")


# ----------------------------------------------------------------------------------------------------------------
# the core install: `pip install .` without extras
# ----------------------------------------------------------------------------------------------------------------
def core_closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` pull in, transitively, with no extra selected."""
    found, pending = {}, list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name not in found:
            found[name] = importlib.metadata.distribution(requirement.name)
            pending.extend(found[name].requires or [])
    return found


@pytest.fixture(scope="module")
def core(installed, tmp_path_factory):
    """An environment with the wheel and only what its core requirements (read from the wheel's metadata) pull in:
    the closure's files are linked from this venv, so it runs offline in seconds."""
    wheel_metadata = next(installed["target"].glob("parcae_transformers-*.dist-info"))
    requirements = importlib.metadata.PathDistribution(wheel_metadata).requires
    site_dir = tmp_path_factory.mktemp("core-site")
    for distribution in core_closure(requirements).values():
        for top in {file.parts[0] for file in distribution.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth") and not (site_dir / top).exists():
                os.symlink(distribution.locate_file(top), site_dir / top)
    env = {**os.environ, "PYTHONPATH": f"{installed['target']}{os.pathsep}{site_dir}", "PYTHONNOUSERSITE": "1",
           "HF_HUB_OFFLINE": "1"}
    return dict(installed, env=env)


def test_core_install_leaves_out_training_and_evaluation_dependencies(core):
    script = ("import importlib.util as u;"
              "print(*[m for m in ('accelerate', 'datasets', 'lm_eval', 'scipy', 'matplotlib', 'tensorboard', 'peft')"
              " if u.find_spec(m)])")
    result = run(core, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []


def test_core_install_loads_the_demo_and_generates(core):
    result = run(core, "-m", "modeling_parcae.cli", "generate", "--max-new-tokens", "8", "--compare-loops", "1,4",
                 "ROMEO:")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "num_loops=1" in result.stdout and "num_loops=4" in result.stdout


@pytest.mark.parametrize(("command", "extra"), [(["train", "tiny-cpu"], "train"),
                                                (["eval", "--model", "x", "--tasks", "copa"], "eval")])
def test_core_install_names_the_missing_extra(core, command, extra):
    result = run(core, "-m", "modeling_parcae.cli", *command)
    assert result.returncode == 2
    assert f"needs the [{extra}] extra" in result.stderr and f"parcae-transformers[{extra}]" in result.stderr
