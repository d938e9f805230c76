"""Training recipes: one YAML file describes a whole run (model, tokenizer, data, optimisation, checkpoints, eval).

Recipes are plain nested dataclasses so that every key has a type and a default, and a typo is an error that names
the key instead of a silently ignored setting. Command-line overrides use dotted keys (``training.max_steps=20``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from modeling_parcae.configuration_parcae import ParcaeConfig


@dataclasses.dataclass
class ModelRecipe:
    """Which architecture to build: a preset from ``configuration/presets`` and/or explicit ``ParcaeConfig`` fields."""

    preset: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class DataRecipe:
    """Where documents come from and how they become ``block_size + 1`` token rows."""

    path: str = ""
    name: str | None = None
    split: str = "train"
    streaming: bool = False
    text_column: str = "text"
    sample_by: str = "paragraph"
    block_size: int = 2048
    shuffle_buffer: int = 10_000
    validation_path: str | None = None
    validation_name: str | None = None
    validation_split: str | None = None
    validation_documents: int = 256


@dataclasses.dataclass
class TrainingRecipe:
    """Optimisation: the official MuonAdamW recipe (``recpre/optim/muon_adamw.py``) with torch/transformers parts."""

    global_batch_size: int = 256
    micro_batch_size: int = 32
    max_steps: int | None = None
    max_tokens: float | None = None
    adamw_lr: float = 8e-3
    adamw_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.8, 0.95)
    eps: float = 1e-10
    muon_lr: float = 8e-3
    muon_weight_decay: float = 0.2
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_ns_steps: int = 5
    warmup_fraction: float = 0.0
    cooldown_fraction: float = 0.5
    grad_clip: float = 1.0
    mixed_precision: str = "bf16"
    # regional compilation of every block (modeling_parcae.compilation): null = on where CUDA is present, where a step
    # runs long enough to repay the compile (tens of seconds) and inductor's GPU kernels are what users expect; on CPU
    # the compile costs more than a short run saves
    compile: bool | None = None
    compile_backend: str = "inductor"


@dataclasses.dataclass
class CheckpointRecipe:
    every_steps: int = 1000
    keep_last: int = 2


@dataclasses.dataclass
class EvalRecipe:
    every_steps: int = 1000
    depths: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 8


@dataclasses.dataclass
class Recipe:
    """A full training run: what to build, what to train it on, how, and where to write it."""

    run_name: str = "parcae"
    output_dir: str = "runs/parcae"
    seed: int = 42
    tokenizer: str = ""
    model: ModelRecipe = dataclasses.field(default_factory=ModelRecipe)
    data: DataRecipe = dataclasses.field(default_factory=DataRecipe)
    training: TrainingRecipe = dataclasses.field(default_factory=TrainingRecipe)
    checkpoint: CheckpointRecipe = dataclasses.field(default_factory=CheckpointRecipe)
    eval: EvalRecipe = dataclasses.field(default_factory=EvalRecipe)
    trackers: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    log_every_steps: int = 1


def bundled_recipe_path(name: str) -> Path:
    """Path of a recipe shipped in ``configuration/recipes`` (``tiny-cpu`` -> ``.../tiny-cpu.yaml``)."""
    return Path(str(importlib.resources.files("modeling_parcae.configuration") / "recipes" / f"{name}.yaml"))


def load_recipe(path_or_name: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (a path, or the name of a bundled recipe), apply ``key=value`` overrides, validate."""
    path = Path(path_or_name)
    if not path.exists():
        bundled = bundled_recipe_path(str(path_or_name))
        if not bundled.exists():
            raise FileNotFoundError(f"recipe {path_or_name!r} is neither a file nor a bundled recipe name")
        path = bundled
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a mapping at the top level")
    for override in overrides or []:
        _apply_override(raw, override)
    recipe = _build(Recipe, raw, prefix="")
    recipe.tokenizer = _next_to(path, recipe.tokenizer)
    recipe.data.path = _next_to(path, recipe.data.path)
    if recipe.data.validation_path:
        recipe.data.validation_path = _next_to(path, recipe.data.validation_path)
    validate_recipe(recipe)
    return recipe


def _next_to(recipe_path: Path, value: str) -> str:
    """Relative paths are looked up next to the recipe first (bundled tokenizers), then in the working directory."""
    candidate = recipe_path.parent / value
    return str(candidate) if value and not Path(value).is_absolute() and candidate.exists() else value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain dict for logging (trackers' hparams) and for saving next to checkpoints."""
    return dataclasses.asdict(recipe)


def flatten_recipe(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"max_steps": 40}}`` -> ``{"training.max_steps": 40}``: the dotted keys overrides use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_recipe(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def validate_recipe(recipe: Recipe) -> None:
    """Reject inconsistent settings before any data is read or any model is built."""
    training = recipe.training
    if (training.max_steps is None) == (training.max_tokens is None):
        raise ValueError("recipe: give exactly one of training.max_steps and training.max_tokens")
    positive = {"training.global_batch_size": training.global_batch_size,
                "training.micro_batch_size": training.micro_batch_size, "training.max_steps": training.max_steps,
                "training.max_tokens": training.max_tokens, "data.block_size": recipe.data.block_size,
                "eval.batch_size": recipe.eval.batch_size}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ValueError(f"recipe: {key} must be positive, got {value}")
    if training.global_batch_size % training.micro_batch_size:
        raise ValueError(
            f"recipe: training.global_batch_size ({training.global_batch_size}) must be a multiple of "
            f"training.micro_batch_size ({training.micro_batch_size})"
        )
    if not recipe.data.path:
        raise ValueError("recipe: data.path is required (a local file/folder or a Hub dataset id)")
    if not recipe.tokenizer:
        raise ValueError("recipe: tokenizer is required (a local tokenizer folder or a Hub repo id)")
    if recipe.model.preset is None and not recipe.model.config:
        raise ValueError("recipe: model needs a preset and/or config fields")
    config_fields = {field.name for field in dataclasses.fields(ParcaeConfig)}
    unknown = sorted(f"model.config.{key}" for key in recipe.model.config if key not in config_fields)
    if unknown:  # ParcaeConfig accepts arbitrary kwargs, so a typo would otherwise pass silently
        raise _UnknownKeys(unknown)
    if training.mixed_precision not in ("bf16", "no"):  # fp16 would need loss scaling, which the official recipe lacks
        raise ValueError(f"recipe: training.mixed_precision must be bf16 or no, got {training.mixed_precision!r}")
    if not 0.0 <= training.warmup_fraction + training.cooldown_fraction <= 1.0:
        raise ValueError("recipe: training.warmup_fraction + training.cooldown_fraction must lie in [0, 1]")
    if recipe.data.sample_by not in ("line", "paragraph", "document"):
        raise ValueError(f"recipe: data.sample_by must be line, paragraph or document, got {recipe.data.sample_by!r}")
    if any(depth < 1 for depth in recipe.eval.depths):
        raise ValueError(f"recipe: eval.depths must be positive loop counts, got {recipe.eval.depths}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate a recipe dataclass from a mapping, listing every unknown key (with its dotted path) at once."""
    if not isinstance(raw, dict):
        raise ValueError(f"recipe: {prefix.rstrip('.') or 'top level'} must be a mapping, got {raw!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(prefix + key for key in raw if key not in fields)
    nested_unknown: list[str] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            continue
        field_type = _nested_dataclass(cls, key)
        if field_type is not None:
            try:
                values[key] = _build(field_type, value, prefix=f"{prefix}{key}.")
            except _UnknownKeys as error:
                nested_unknown.extend(error.keys)
        else:
            values[key] = _coerce(fields[key], value, prefix + key)
    unknown = sorted(unknown + nested_unknown)
    if unknown:
        raise _UnknownKeys(unknown)
    return cls(**values)


_PYTHON_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "tuple": tuple, "dict": dict}


def _coerce(field: dataclasses.Field, value: Any, dotted: str) -> Any:
    """Check a value against its field's type, naming the dotted key (``training.max_steps=ten`` is an error here,
    not a traceback later). YAML reads ``1e-10`` (no dot) as a string and lists for tuples: those get their type."""
    kind = str(field.type).replace(" | None", "")
    if value is None:
        if "None" in str(field.type):
            return None
        raise ValueError(f"recipe: {dotted} must be set (got null)")
    if kind == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"recipe: {dotted} must be a number, got {value!r}") from None
    if kind.startswith("tuple") and isinstance(value, list):
        value = tuple(value)
    expected = _PYTHON_TYPES[kind.split("[")[0]]
    wrong_bool = isinstance(value, bool) and expected is not bool
    if wrong_bool or not isinstance(value, expected):
        raise ValueError(f"recipe: {dotted} must be of type {field.type}, got {value!r}")
    if kind == "list[int]" and not all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        raise ValueError(f"recipe: {dotted} must be a list of integers, got {value!r}")
    return value


class _UnknownKeys(ValueError):
    def __init__(self, keys: list[str]):
        super().__init__(f"recipe: unknown key(s): {', '.join(keys)}")
        self.keys = keys


def _nested_dataclass(cls: type, key: str) -> type | None:
    nested = {"model": ModelRecipe, "data": DataRecipe, "training": TrainingRecipe, "checkpoint": CheckpointRecipe,
              "eval": EvalRecipe}
    return nested.get(key) if cls is Recipe else None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """``a.b=value``: the value is parsed as YAML so numbers, lists and null keep their types."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key=value (e.g. training.max_steps=20)")
    dotted, value = override.split("=", 1)
    node = raw
    *parents, leaf = dotted.strip().split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {parent} is not a section")
    node[leaf] = yaml.safe_load(value)
