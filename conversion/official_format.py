"""Reading checkpoints in the official ``parcae_lm`` layouts (savers in ``parcae_lm/__init__.py``,
``receval/models/parcae.py`` and ``scripts/train.py``).

The official savers disagree on file names, key prefixes and whether ``config.json`` carries ``_class_name``; this
module turns any of them into one ``OfficialCheckpoint`` (plain config dict + unprefixed state dict + architecture).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


# in the order the official loaders try them, plus the parcae_lm saver's name
WEIGHT_FILES = ("model.pt", "pytorch_model.bin", "model.safetensors", "model.bin")
# wrappers that prefix every key: DDP, torch.compile, the receval wrapper, Lightning Fabric
KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "_forward_module.")
OFFICIAL_CLASS_NAMES = {"ParcaeConfig": "parcae", "GPTConfig": "gpt"}
# fields only the official Parcae dataclass has, and the one only GPTConfig has
_PARCAE_FIELDS = ("n_layers_in_recurrent_block", "n_layers_in_prelude", "n_layers_in_coda", "mean_recurrence")
_GPT_FIELDS = ("n_layer",)


class OfficialFormatError(ValueError):
    """The source is not a readable official checkpoint (names what is wrong)."""


@dataclass
class OfficialCheckpoint:
    config: dict
    state_dict: dict[str, torch.Tensor]
    architecture: str  # "parcae" or "gpt"


def is_official_config(config: dict) -> bool:
    """True for a config.json written by one of the official savers (no transformers ``model_type``)."""
    return "model_type" not in config and "n_embd" in config


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise OfficialFormatError(f"{directory} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise OfficialFormatError(f"{path} is not valid JSON: {error}") from error


def find_weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise OfficialFormatError(f"{directory} holds none of the official weight files {', '.join(WEIGHT_FILES)}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a weights file memory-mapped (so conversion never holds two copies), unwrapping training checkpoints."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = _torch_load(path)
    except Exception as error:  # torch and safetensors raise many types for a damaged file
        raise OfficialFormatError(f"cannot read weights file {path} (truncated or corrupt?): {error}") from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # Lightning Fabric training checkpoint (official ``scripts/train.py``)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialFormatError(f"{path} does not hold a state dict of tensors")
    return strip_prefixes(state)


def _torch_load(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) pickle format


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes repeatedly (``module._orig_mod.x`` -> ``x``); two keys colliding is an error."""
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        while name.startswith(KEY_PREFIXES):
            name = name[len(next(p for p in KEY_PREFIXES if name.startswith(p))):]
        if name in stripped:
            raise OfficialFormatError(f"keys collide after removing wrapper prefixes: {key!r} -> {name!r}")
        stripped[name] = tensor
    return stripped


def detect_architecture(config: dict, keys) -> str:
    """``parcae`` or ``gpt``, from ``_class_name`` if present, else from the fields and tensor names.

    The official ``parcae_lm.from_pretrained`` defaults a missing ``_class_name`` to GPT, which misreads every
    checkpoint the receval wrapper saved (``receval/models/parcae.py``); here the evidence must agree or we refuse.
    """
    keys = list(keys)
    has_core_keys = any(k.startswith("transformer.core_block.") for k in keys)
    has_gpt_keys = any(k.startswith("transformer.h.") for k in keys)
    evidence = set()
    if any(field in config for field in _PARCAE_FIELDS) or config.get("model_class_name") == "Parcae":
        evidence.add("parcae")
    if any(config.get(field) is not None for field in _GPT_FIELDS):
        evidence.add("gpt")
    if has_core_keys:
        evidence.add("parcae")
    if has_gpt_keys:
        evidence.add("gpt")
    class_name = config.get("_class_name")
    if class_name is not None:
        if class_name not in OFFICIAL_CLASS_NAMES:
            raise OfficialFormatError(
                f"config.json names architecture {class_name!r}; only {', '.join(OFFICIAL_CLASS_NAMES)} can be converted"
            )
        evidence.add(OFFICIAL_CLASS_NAMES[class_name])
    if len(evidence) != 1:
        found = " and ".join(sorted(evidence)) or "neither"
        raise OfficialFormatError(
            f"cannot tell whether this is a Parcae or a GPT-baseline checkpoint: config fields and tensor names point "
            f"to {found}"
        )
    return evidence.pop()


def read_official_checkpoint(source: str | Path) -> OfficialCheckpoint:
    """Read an official checkpoint: a directory (any official layout) or a weights file next to its config.json
    (e.g. a training checkpoint ``step-00100000-run.pth``)."""
    source = Path(source)
    directory = source.parent if source.is_file() else source
    config = read_config(directory)
    if config.get("model_type") == "parcae":
        raise OfficialFormatError(f"{directory} is already a transformers Parcae checkpoint (model_type 'parcae'): "
                                  "it loads as it is; to write the official format, `parcae convert SRC DST --to "
                                  "official`")
    if not is_official_config(config):
        kind = f"model_type {config['model_type']!r}" if "model_type" in config else "no n_embd field"
        raise OfficialFormatError(f"{directory}/config.json is not an official Parcae config ({kind})")
    state = load_state_dict(source if source.is_file() else find_weights_file(directory))
    return OfficialCheckpoint(config, state, detect_architecture(config, state))
