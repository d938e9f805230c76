"""`make setup`: torch only where it is missing, an index only when the user passes one, and no package-index host
named anywhere in the repository.

The set-up recipe runs for real with a stand-in virtual environment whose ``python`` answers ``import torch`` as
told and whose ``pip`` records its arguments, so what the Makefile decides is observed without installing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# assembled from parts so that this file, too, names no host
INDEX_HOSTS = tuple(".".join(parts) for parts in (("pypi", "org"), ("pythonhosted", "org"),
                                                  ("download", "pytorch", "org"), ("anaconda", "org"),
                                                  ("pypi", "nvidia", "com")))


def fake_venv(root: Path, torch_present: bool) -> Path:
    bin_dir = root / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit {0 if torch_present else 1}; fi\n'
        "exit 0\n")
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{root}/pip.log"\n')
    for tool in ("python", "pip"):
        (bin_dir / tool).chmod(0o755)
    return root / "venv"


def make_setup(tmp_path: Path, torch_present: bool, *variables: str) -> list[str]:
    """Run ``make setup`` against the stand-in venv; returns the pip command lines it issued."""
    venv = fake_venv(tmp_path, torch_present)
    env = {**os.environ, "PATH": f"{tmp_path}/nogpu:{os.environ['PATH']}"}
    (tmp_path / "nogpu").mkdir()
    (tmp_path / "nogpu" / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")  # a machine without a GPU
    (tmp_path / "nogpu" / "nvidia-smi").chmod(0o755)
    if shutil.which("make") is None:
        pytest.skip("make is not installed on this machine")
    result = subprocess.run(["make", "--no-print-directory", "-f", str(REPO_ROOT / "Makefile"), "-C", str(REPO_ROOT),
                             "setup", f"VENV={venv}", *variables], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    log = tmp_path / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_setup_leaves_an_existing_torch_alone(tmp_path):
    calls = make_setup(tmp_path, torch_present=True)
    assert calls and not any("torch" in call for call in calls), calls  # only the project's own install


def test_setup_installs_the_cpu_build_where_torch_is_missing_and_no_gpu_answers(tmp_path):
    calls = make_setup(tmp_path, torch_present=False)
    torch_calls = [call for call in calls if "torch==" in call]
    assert torch_calls and torch_calls[0].endswith("+cpu")
    assert not any("index-url" in call for call in calls)  # only the indexes pip is configured with


def test_a_user_index_is_passed_only_when_given(tmp_path):
    calls = make_setup(tmp_path, False, "TORCH_INDEX_URL=file:///srv/user-torch-index")
    torch_calls = [call for call in calls if "torch==" in call]
    assert torch_calls and all("--extra-index-url file:///srv/user-torch-index" in c for c in torch_calls)
    assert not any("index" in call for call in calls if "torch==" not in call)  # the project's own install: none


def test_no_package_index_host_is_named_in_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in files.splitlines():
        path = REPO_ROOT / name
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        offenders += [f"{name}: {host}" for host in INDEX_HOSTS if host in text]
    assert offenders == []
