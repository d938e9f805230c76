"""The two conversions: official checkpoint -> transformers directory, and transformers directory -> official.

Both validate everything before writing and write through :func:`atomic_directory`, so a failure leaves no DST.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modeling_parcae.configuration_parcae import ParcaeConfig
from modeling_parcae.atomic import atomic_directory, check_not_overlapping, remove_abandoned_staging
from modeling_parcae.conversion.model_card import render_model_card
from modeling_parcae.conversion.official_config import official_config_from_parcae, parcae_config_from_official
from modeling_parcae.conversion.official_format import is_official_config, read_config, read_official_checkpoint
from modeling_parcae.conversion.state_dict import expected_hf_shapes, hf_to_official, official_to_hf
from modeling_parcae.conversion.tokenizer import load_official_tokenizer
from modeling_parcae.inputs import read_json_file


logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"
MAX_NAMED_TENSORS = 10  # a diverged run has NaN everywhere: the warning names the first ones and counts the rest
# what a tokenizer folder holds; the official loaders read tokenizer.json (+ the declared specials of the config)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert_official_to_transformers(source_dir: str | Path, destination: str | Path, *,
                                     tokenizer_source: str | Path | None = None, source_name: str | None = None,
                                     max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                                     tokenizer_hub_kwargs: dict | None = None) -> Path:
    """Convert a local official checkpoint (directory, or weights file next to config.json); returns DST.

    ``tokenizer_source`` is a tokenizer directory or Hub id; ``None`` uses ``source_dir`` when it holds a
    ``tokenizer.json`` and otherwise writes no tokenizer.
    """
    from modeling_parcae.modeling_parcae import ParcaeForCausalLM

    source_dir = Path(source_dir)
    check_not_overlapping(source_dir, destination)
    remove_abandoned_staging(Path(destination))  # what a killed conversion left, even if this one fails early
    checkpoint = read_official_checkpoint(source_dir)
    warn_non_finite(checkpoint.state_dict, source_dir)
    config = parcae_config_from_official(checkpoint.config, checkpoint.architecture)
    if checkpoint.config.get("name"):  # kept for the way back (the folder name is not the model's name)
        config.official_name = checkpoint.config["name"]
    state = official_to_hf(checkpoint.state_dict, config, expected_hf_shapes(config))
    if tokenizer_source is None and (source_dir / "tokenizer.json").is_file():
        tokenizer_source = source_dir
    tokenizer = None
    if tokenizer_source is not None:
        tokenizer = load_official_tokenizer(tokenizer_source, config.max_position_embeddings,
                                            **(tokenizer_hub_kwargs or {}))

    with torch.device("meta"):
        model = ParcaeForCausalLM(config)
    # assign=True adopts the (memory-mapped) checkpoint tensors instead of copying them into fresh parameters
    model.load_state_dict(state, strict=True, assign=True)
    with atomic_directory(destination, overwrite=overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card = render_model_card(config, source_name or str(source_dir))
        (staging / "README.md").write_text(card)
    return Path(destination)


def convert_transformers_to_official(source_dir: str | Path, destination: str | Path, *,
                                     overwrite: bool = False) -> Path:
    """Write ``config.json`` (with ``_class_name``) + ``model.pt`` as ``parcae_lm.save_pretrained`` does, under the
    official name the model came with (else the source folder's name), with the source's tokenizer files."""
    source_dir = Path(source_dir)
    check_not_overlapping(source_dir, destination)
    remove_abandoned_staging(Path(destination))  # what a killed conversion left, even if this one fails early
    if is_official_config(read_config(source_dir)):
        raise ValueError(f"{source_dir} is already in the official format")
    config = ParcaeConfig.from_pretrained(source_dir)
    state = read_safetensors_checkpoint(source_dir)
    warn_non_finite(state, source_dir)
    official_state = hf_to_official(state, config, expected_hf_shapes(config))
    name = getattr(config, "official_name", None) or source_dir.absolute().name
    official_config = official_config_from_parcae(config, name=name)
    with atomic_directory(destination, overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(official_config, indent=2))
        torch.save(official_state, staging / "model.pt")
        for tokenizer_file in TOKENIZER_FILES:
            if (source_dir / tokenizer_file).is_file():
                shutil.copyfile(source_dir / tokenizer_file, staging / tokenizer_file)
    return Path(destination)


def warn_non_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """A checkpoint with NaN or inf weights (a diverged run) converts faithfully, but the model it makes computes
    NaN: the tensors are named, so that it is not published unnoticed, and the copy is still written for inspection."""
    bad = [name for name, tensor in state.items()
           if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:MAX_NAMED_TENSORS]) + (f" and {len(bad) - MAX_NAMED_TENSORS} more"
                                                        if len(bad) > MAX_NAMED_TENSORS else "")
        logger.warning("parcae convert: %s holds NaN or inf values in %d tensor(s): %s; the converted model will "
                       "compute NaN (was the run that wrote it diverging?)", source, len(bad), shown)


def read_safetensors_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) transformers safetensors checkpoint."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json_file(index, "weights index")["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory} holds no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(directory / name, framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except SafetensorError as error:
            raise ValueError(f"{directory / name} is truncated or corrupt ({error})") from None
    return state
