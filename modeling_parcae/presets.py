"""Named model presets, stored as JSON under ``configuration/presets`` (installed as package data)."""

import json
from importlib import resources

from modeling_parcae.configuration_parcae import ParcaeConfig


def _preset_files() -> dict:
    folder = resources.files("modeling_parcae.configuration").joinpath("presets")
    return {entry.name[: -len(".json")]: entry for entry in folder.iterdir() if entry.name.endswith(".json")}


def list_presets() -> list[str]:
    """Names accepted by :func:`load_preset`, e.g. ``parcae-140m``, ``gpt-140m``."""
    return sorted(_preset_files())


def load_preset(name: str, **overrides) -> ParcaeConfig:
    """Build a ``ParcaeConfig`` from a named preset; keyword arguments override preset fields."""
    files = _preset_files()
    if name not in files:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(files))}")
    fields = json.loads(files[name].read_text())
    fields.pop("_comment", None)
    return ParcaeConfig(**{**fields, **overrides})
