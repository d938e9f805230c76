"""Locating the CORE eval bundle: an explicit directory, ``$PARCAE_EVAL_BUNDLE``, or a checksummed download cached
under ``$PARCAE_CACHE`` (default ``~/.cache/parcae``) — the same zip the official evaluator (and nanochat) uses."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from modeling_parcae.eval.specs import TASKS, V2_BASELINE_OVERRIDES

logger = logging.getLogger(__name__)

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# sha256 of BUNDLE_URL as pinned by a third-party project; not verifiable from this machine (no S3 access).
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
ENV_BUNDLE = "PARCAE_EVAL_BUNDLE"
ENV_CACHE = "PARCAE_CACHE"
HOW_TO_POINT_AT_A_BUNDLE = (
    f"point at an unpacked bundle with {ENV_BUNDLE}=DIR, `parcae eval --bundle DIR`, or for lm_eval "
    "`--metadata '{\"bundle\": \"DIR\"}'` (DIR holds core.yaml, eval_meta_data.csv and eval_data/)")


def default_cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "parcae")


def check_bundle_dir(path: str | Path) -> Path:
    """Raise a clear error unless ``path`` looks like an eval bundle (it must hold ``core.yaml``)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"eval bundle directory {path} does not exist")
    if not (path / "core.yaml").is_file():
        raise ValueError(f"{path} is not an eval bundle: core.yaml is missing (expected core.yaml, "
                         "eval_meta_data.csv and eval_data/<category>/<task>.jsonl)")
    return path


def resolve_bundle(path: str | Path | None = None, *, url: str = BUNDLE_URL, sha256: str | None = BUNDLE_SHA256,
                   cache_dir: str | Path | None = None) -> Path:
    """Bundle directory from ``path``, else ``$PARCAE_EVAL_BUNDLE``, else the cache (downloading it once)."""
    if path is not None:
        return check_bundle_dir(path)
    if os.environ.get(ENV_BUNDLE):
        return check_bundle_dir(os.environ[ENV_BUNDLE])
    target = Path(cache_dir or default_cache_dir()) / "eval_bundle"
    if not target.exists():
        if _offline():
            raise FileNotFoundError(f"no CORE eval bundle is configured and HF_HUB_OFFLINE=1 forbids downloading it; "
                                    f"{HOW_TO_POINT_AT_A_BUNDLE}")
        try:
            download_bundle(url, target, sha256)
        except OSError as error:  # urllib's URLError included
            raise FileNotFoundError(f"could not download the CORE eval bundle ({error}); "
                                    f"{HOW_TO_POINT_AT_A_BUNDLE}") from None
    return check_bundle_dir(target)


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it: the switch users already set for "no network"."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def download_bundle(url: str, target: Path, sha256: str | None) -> Path:
    """Download ``url`` (a zip), verify its sha256 and unpack it so that ``target`` appears atomically: everything is
    staged in a temporary directory next to ``target`` and removed on any failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".eval_bundle-", dir=target.parent))
    try:
        archive = staging / "bundle.zip"
        logger.info("downloading the eval bundle from %s", url)
        digest = hashlib.sha256()
        with urllib.request.urlopen(url) as response, open(archive, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}")
        unpacked = staging / "unpacked"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpacked)
        root = unpacked if (unpacked / "core.yaml").is_file() else next(
            (p.parent for p in unpacked.glob("*/core.yaml")), unpacked)
        check_bundle_dir(root)
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_baselines(bundle: str | Path, version: str = "v1") -> dict[str, float]:
    """Random baselines as fractions. v1 = the bundle's ``eval_meta_data.csv`` (paper-comparable); v2 = DCLM's
    corrected values (``eval_meta_data_v2.csv`` if the bundle has it, else v1 with the known corrections)."""
    if version not in ("v1", "v2"):
        raise ValueError(f"baselines must be 'v1' or 'v2', not {version!r}")
    bundle = Path(bundle)
    v2_file = bundle / "eval_meta_data_v2.csv"
    source = v2_file if version == "v2" and v2_file.is_file() else bundle / "eval_meta_data.csv"
    with open(source, newline="", encoding="utf-8") as f:
        percent = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    if version == "v2" and source != v2_file:
        percent.update(V2_BASELINE_OVERRIDES)
    return {label: percent[label] / 100.0 for label in TASKS if label in percent}


def split_available(bundle: str | Path, labels: list[str]) -> tuple[list[str], list[str]]:
    """(labels whose jsonl exists, labels whose jsonl is missing) — missing ones are skipped with a warning."""
    present = [label for label in labels if (Path(bundle) / "eval_data" / TASKS[label].dataset_uri).is_file()]
    return present, [label for label in labels if label not in present]
