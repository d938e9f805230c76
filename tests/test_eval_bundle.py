"""Eval bundle resolution: explicit directory, environment variable, checksummed download into the cache (tested
with local file:// URLs; nothing half-written may remain in the cache on failure)."""

import hashlib
import zipfile

import pytest

from modeling_parcae.eval.bundle import ENV_BUNDLE, check_bundle_dir, resolve_bundle


def _zip(tmp_path, with_core=True):
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        if with_core:
            zf.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
        zf.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\ncopa,50\n")
        zf.writestr("eval_bundle/eval_data/commonsense_reasoning/copa.jsonl", '{"query": "q", "choices": ["a"], '
                    '"gold": 0}\n')
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_BUNDLE, raising=False)


def test_download_checksum_mismatch_leaves_cache_empty(tmp_path):
    archive, _ = _zip(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="checksum mismatch"):
        resolve_bundle(url=archive.as_uri(), sha256="0" * 64, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_download_unpacks_atomically_and_is_reused(tmp_path):
    archive, digest = _zip(tmp_path)
    cache = tmp_path / "cache"
    path = resolve_bundle(url=archive.as_uri(), sha256=digest, cache_dir=cache)
    assert path == cache / "eval_bundle"
    assert (path / "eval_data" / "commonsense_reasoning" / "copa.jsonl").is_file()
    assert [p.name for p in cache.iterdir()] == ["eval_bundle"]  # no staging leftovers
    archive.unlink()  # second use must not download again
    assert resolve_bundle(url=archive.as_uri(), sha256=digest, cache_dir=cache) == path


def test_download_of_archive_without_core_yaml_fails_cleanly(tmp_path):
    archive, digest = _zip(tmp_path, with_core=False)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="core.yaml is missing"):
        resolve_bundle(url=archive.as_uri(), sha256=digest, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_directory_without_core_yaml_is_rejected(tmp_path):
    (tmp_path / "eval_data").mkdir()
    with pytest.raises(ValueError, match="not an eval bundle: core.yaml is missing"):
        resolve_bundle(tmp_path)
    with pytest.raises(FileNotFoundError):
        check_bundle_dir(tmp_path / "absent")


def test_environment_variable_is_used(tmp_path, monkeypatch):
    (tmp_path / "core.yaml").write_text("icl_tasks: []\n")
    monkeypatch.setenv(ENV_BUNDLE, str(tmp_path))
    assert resolve_bundle(cache_dir=tmp_path / "never") == tmp_path
    assert not (tmp_path / "never").exists()
