"""transformers' own common model tests, taken from the source distribution of the *installed* release.

The test mixins are not part of the transformers wheel. ``pip download transformers==<installed> --no-binary :all:``
fetches the release's source distribution once into a cache outside the repository (``PARCAE_TRANSFORMERS_TESTS_CACHE``,
default ``~/.cache/parcae-tests``); only its ``tests/`` folder is extracted, and it is imported as the package
``transformers_upstream_tests`` so that it cannot shadow this repository's ``tests/``.

The source distribution ships the top-level ``tests/*.py`` files only: the sub-packages they import
(``tests/generation``, ``tests/exporters``, ``tests/utils``, ``tests/pipelines``) are absent. :func:`install_missing`
gives the three names ``test_modeling_common`` and ``test_configuration_common`` import from them a minimal stand-in
(written here, no upstream code), and the tests that would exercise them are skipped by the caller, saying so.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers


PACKAGE = "transformers_upstream_tests"
CACHE_ENV = "PARCAE_TRANSFORMERS_TESTS_CACHE"


class UnavailableError(RuntimeError):
    """The upstream tests could not be obtained; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "parcae-tests"))


def upstream_tests_dir(version: str = transformers.__version__) -> Path:
    """``<cache>/transformers-<version>/tests``, downloading and extracting the source distribution when missing."""
    target = cache_root() / f"transformers-{version}"
    tests = target / "tests"
    if (tests / "__init__.py").is_file():
        return tests
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        archive = _download_sdist(version, Path(staging))
        extracted = Path(staging) / "extracted"
        _extract_tests(archive, extracted)
        try:  # another process may have finished first; its copy is identical
            if target.is_dir():
                (extracted / "tests").rename(tests)
            else:
                extracted.rename(target)
        except OSError:
            if not (tests / "__init__.py").is_file():
                raise
    return tests


def _download_sdist(version: str, destination: Path) -> Path:
    base = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
            "--no-deps", "--quiet", "-d", str(destination)]
    # without build isolation pip reads the sdist's metadata with the installed setuptools (no extra download)
    errors = []
    for extra in (["--no-build-isolation"], []):
        result = subprocess.run(base + extra, capture_output=True, text=True, timeout=600)
        archives = sorted(destination.glob("transformers-*.tar.gz"))
        if result.returncode == 0 and archives:
            return archives[0]
        errors.append(result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"])
    raise UnavailableError(f"pip download transformers=={version} --no-binary :all: failed: {errors[-1][0]}")


def _extract_tests(archive: Path, destination: Path) -> None:
    """Extract ``<sdist>/tests/**`` (and nothing else) to ``destination/tests``."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) >= 2 and parts[1] == "tests" and (member.isfile() or member.isdir()):
                member.name = str(Path(*parts[1:]))
                members.append(member)
        if not any(m.name == "tests/test_modeling_common.py" for m in members):
            raise UnavailableError(f"{archive.name} has no tests/test_modeling_common.py")
        tar.extractall(destination, members=members, filter="data")
    # the sdist omits the package marker, which test_configuration_common's direct_transformers_import executes
    (destination / "tests" / "__init__.py").touch()


# Stand-ins for what the source distribution lacks. Keep them minimal: they only let the shipped files import.
MISSING = {
    # tests/exporters/test_export.py: the torch.export tests are not shipped, so ModelTesterMixin gets no export tests
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    # tests/generation/test_utils.py: the generate() tests are not shipped (tests/test_generation.py covers ours)
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    # tests/utils/test_configuration_utils.py: common PreTrainedConfig kwargs set to non-default values, for
    # ConfigTester.create_and_test_config_common_properties; our own values, one per common attribute.
    "utils.test_configuration_utils": {"config_common_kwargs": {
        "return_dict": False, "output_hidden_states": True, "output_attentions": True, "dtype": "float16",
        "tie_word_embeddings": False, "is_encoder_decoder": False, "chunk_size_feed_forward": 5,
        "architectures": ["BertModel"], "id2label": {0: "label"}, "label2id": {"label": "0"},
        "problem_type": "regression", "tokenizer_class": "BertTokenizerFast", "prefix": "prefix",
        "sep_token_id": 2, "task_specific_params": {"translation": "some_params"},
    }},
}


def install_missing() -> None:
    """Register the package and the stand-in modules so that the shipped test files import unchanged."""
    if PACKAGE in sys.modules:
        return
    tests = upstream_tests_dir()
    package = types.ModuleType(PACKAGE)  # upstream tests/ has no __init__.py: a package by path only
    package.__path__ = [str(tests)]
    sys.modules[PACKAGE] = package
    for dotted, names in MISSING.items():
        if (tests / (dotted.replace(".", "/") + ".py")).is_file():
            continue  # a release that ships it: use the real one
        parent = PACKAGE
        for part in dotted.split(".")[:-1]:
            parent = f"{parent}.{part}"
            sys.modules.setdefault(parent, types.ModuleType(parent))
        module = types.ModuleType(f"{PACKAGE}.{dotted}")
        module.__dict__.update(names)
        sys.modules[module.__name__] = module


def shipped(dotted: str) -> bool:
    """Whether the extracted release ships ``tests/<dotted>.py`` itself (not a stand-in)."""
    return (upstream_tests_dir() / (dotted.replace(".", "/") + ".py")).is_file()


def import_upstream(module: str) -> types.ModuleType:
    """``import transformers_upstream_tests.<module>``, after :func:`install_missing`."""
    install_missing()
    return importlib.import_module(f"{PACKAGE}.{module}")
