"""What a resumed run may change in its recipe, and how the change is told.

A checkpoint's weights, optimizer moments and data position mean something only under the recipe that wrote them, so
a resume compares the recipe with the one the run saved (``OUTPUT_DIR/recipe.yaml``). Extending (or shortening) the
run, and how it is compiled, evaluated, checkpointed and logged, may change: as transformers' Trainer does on resume,
the learning-rate schedule is then recomputed for the new length at the checkpoint's step, and the output says so.
Any other difference (model, data, tokenizer, seed, optimizer settings, batch sizes) is refused naming the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modeling_parcae.atomic import write_atomically
from modeling_parcae.training.checkpoint import checkpoint_name
from modeling_parcae.training.recipe import Recipe, flatten_recipe, recipe_to_dict

RECIPE_FILE = "recipe.yaml"
# dotted keys (or sections, ending in ".") that may differ on resume: they leave the checkpoint's state meaningful
RESUMABLE_KEYS = ("run_name", "output_dir", "trackers", "log_every_steps", "checkpoint.", "eval.",
                  "training.max_steps", "training.max_tokens", "training.compile", "training.compile_backend",
                  "training.mixed_precision")
RUN_LENGTH_KEYS = ("training.max_steps", "training.max_tokens")


def saved_recipe_path(checkpoint: Path) -> Path:
    """The recipe a checkpoint's run saved: ``OUTPUT_DIR/recipe.yaml`` for ``OUTPUT_DIR/checkpoints/step-*``."""
    return Path(checkpoint).parent.parent / RECIPE_FILE


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key whose value differs (or exists on one side)."""
    old, new = flatten_recipe(saved), flatten_recipe(_as_yaml(current))
    keys = sorted(old.keys() | new.keys())
    return {key: (old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)}


def check_resumable(checkpoint: Path, recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """The recipe changes against the run that wrote ``checkpoint``; a ``ValueError`` naming the keys that may not
    change. A run without a saved recipe (not written by ``parcae train``) has nothing to compare."""
    path = saved_recipe_path(checkpoint)
    if not path.is_file():
        return {}
    changes = recipe_changes(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, recipe_to_dict(recipe))
    refused = [key for key in changes if not key.startswith(RESUMABLE_KEYS)]
    if refused:
        raise ValueError(
            f"cannot resume from {checkpoint}: the recipe differs from the run's {path} in "
            f"{_describe(changes, refused)}; the checkpoint's weights, optimizer state and data position belong to "
            f"the saved recipe. Resume with it (parcae train {path} --resume) or start a new output_dir; on resume "
            f"only the run's length and {', '.join(k for k in RESUMABLE_KEYS if k not in RUN_LENGTH_KEYS)} may change")
    return changes


def describe_resumed_changes(changes: dict[str, tuple[Any, Any]], next_step: int, total_steps: int,
                             learning_rate: float) -> str:
    """The console line of a resume with a changed recipe: what changed, and the schedule when the length did."""
    text = f"resuming with recipe changes: {_describe(changes, list(changes))}"
    if any(key in changes for key in RUN_LENGTH_KEYS):
        text += (f"; the learning-rate schedule is recomputed for {total_steps} steps, as transformers' Trainer does "
                 f"on resume: step {next_step} uses learning rate {learning_rate:.3g}")
    return text


def write_recipe(output_dir: Path, recipe: Recipe, changes: dict[str, tuple[Any, Any]], step: int) -> str | None:
    """Save the run's effective recipe as ``OUTPUT_DIR/recipe.yaml``. A changed recipe keeps the one it replaces as
    ``recipe.until-step-XXXXXXXX.yaml`` (the recipe of the steps up to the resume); returns a line saying so."""
    target = output_dir / RECIPE_FILE
    kept = None
    if changes and target.is_file():
        kept = output_dir / f"recipe.until-{checkpoint_name(step)}.yaml"
        previous = target.read_text(encoding="utf-8")
        write_atomically(kept, lambda temporary: temporary.write_text(previous, encoding="utf-8"))
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    write_atomically(target, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return None if kept is None else f"{target} updated; the recipe of steps 1-{step} is kept as {kept}"


def _as_yaml(tree: dict[str, Any]) -> dict[str, Any]:
    """The values as a saved recipe reads back (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(tree))


def _describe(changes: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    return ", ".join(f"{key} ({changes[key][0]!r} -> {changes[key][1]!r})" for key in keys)
