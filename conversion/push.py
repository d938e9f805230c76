"""Publish a converted directory (weights, remote code, tokenizer, model card) to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from modeling_parcae.conversion.checkpoint_folder import missing_remote_code
from modeling_parcae.conversion.model_card import REPO_PLACEHOLDER
from modeling_parcae.conversion.official_format import is_official_config


REQUIRED_FILES = ("config.json", "README.md")  # and the remote code config.json's auto_map names


def check_publishable(directory: str | Path) -> None:
    """Refuse anything that would not load with ``trust_remote_code=True`` from the Hub."""
    directory = Path(directory)
    absent = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    has_weights = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    if not has_weights:
        absent.append("model.safetensors")
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
        if is_official_config(config):
            raise ValueError(f"{directory} is an official checkpoint; run `parcae convert` first")
        if config.get("model_type") != "parcae" or "auto_map" not in config:
            raise ValueError(f"{directory}/config.json is not a Parcae transformers config with auto_map")
        absent += missing_remote_code(directory)
    if absent:
        raise FileNotFoundError(f"{directory} lacks {', '.join(absent)}; is it the output of `parcae convert`?")


def push_converted(directory: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                   commit_message: str = "Upload Parcae model converted with parcae convert", api: HfApi | None = None):
    """Create the repo if needed and upload the directory in one commit, the model card naming ``repo_id``."""
    check_publishable(directory)
    directory = Path(directory)
    card = (directory / "README.md").read_text().replace(REPO_PLACEHOLDER, repo_id)
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
    operations += [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
                   for path in sorted(directory.iterdir())
                   if path.is_file() and path.name != "README.md" and not path.name.startswith(".")]
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.create_commit(repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message)
