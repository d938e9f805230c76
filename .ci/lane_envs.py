"""What the CI lanes that run in environments of their own share: a cache folder kept between runs, environments
built completely or not at all, pip, and the checkout as a wheel (installed into each environment on every run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def env_cache() -> Path:
    return Path(os.environ.get("PARCAE_ENV_CACHE") or Path.home() / ".cache" / "parcae-transformers" / "envs")


def run(command: list[str], **kwargs) -> None:
    subprocess.run(command, check=True, **kwargs)


def make_venv(env: Path) -> None:
    run([sys.executable, "-m", "venv", str(env)])


def pip(env: Path, *args: str) -> None:
    run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args])


def purelib(env: Path) -> str:
    return subprocess.check_output([str(env / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()


def build_atomically(target: Path, build) -> Path:
    """Build an environment in a temporary folder beside ``target`` and move it into place: an interrupted build
    leaves no half environment that a later run would take for a finished one."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def run_marked_tests(env: Path, wheel: Path, marker: str, environment: dict[str, str]) -> bool:
    """Install the checkout's wheel into ``env`` (without dependencies: the environment has them) and run the tests
    marked ``marker`` there. ``-P``: ``python -m`` would put the checkout first on sys.path, shadowing the installed
    package. Only the files that hold such tests are collected: others may import extras the environment lacks."""
    pip(env, "--no-deps", "--force-reinstall", str(wheel))
    files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                   if f"pytest.mark.{marker}" in path.read_text())
    command = [str(env / "bin" / "python"), "-P", "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", *files]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **environment}).returncode == 0


def build_wheel(folder: Path) -> Path:
    """The checkout as a wheel. setuptools stages it in the ignored ``build/``, whose stale copies of deleted modules
    would go into the wheel: it starts empty."""
    shutil.rmtree(REPO / "build", ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w", str(folder),
         str(REPO)])
    return next(folder.glob("parcae_transformers-*.whl"))
