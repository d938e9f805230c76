"""Atomic Accelerate checkpoints: write into a temporary folder, then rename it into place.

A crash (or SIGKILL) while saving leaves only a ``.tmp-*`` folder behind, never a half-written ``step-*`` folder, so
``latest_checkpoint`` always returns a complete checkpoint. Requires a file system shared by all processes (as
``Accelerator.save_state`` itself does for multi-node runs).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_parcae.atomic import atomic_directory, move_into_place, remove_abandoned_staging
from modeling_parcae.modeling_parcae import ParcaeForCausalLM

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def remove_temporaries(directory: Path) -> None:
    """Delete the ``.tmp-*`` folders a crash during an earlier save left in ``directory``."""
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_leftovers(output_dir: Path) -> None:
    """What a killed run left half-written in ``output_dir``: checkpoint temporaries and the final model's staging
    folder. Called when the next run starts, before anything else is written there."""
    remove_temporaries(output_dir / "checkpoints")
    remove_abandoned_staging(output_dir / "final")


@contextmanager
def _without_shared_tensor_notice() -> Iterator[None]:
    """Accelerate warns "Removed shared tensor {'lm_head.weight'} while saving" on every save of a model with tied
    embeddings: expected here (the head is the embedding, re-tied on load), so the notice is held back."""
    notices = logging.getLogger("accelerate.utils.other")
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notices.setLevel(level)


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, keep_last: int) -> Path:
    """``accelerator.save_state`` into ``directory/step-XXXXXXXX`` atomically, keeping the newest ``keep_last``."""
    final = directory / checkpoint_name(step)
    temporary = directory / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        remove_temporaries(directory)
    accelerator.wait_for_everyone()
    with _without_shared_tensor_notice():
        accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # every rank wrote into the same temporary folder, so it is moved here rather than by ``atomic_directory``
        # (one staging folder per process); re-saving a step after a resume retires the old copy first
        move_into_place(temporary, final, retired=directory / f".tmp-old-{checkpoint_name(step)}")
        for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer, destination: Path) -> None:
    """``save_pretrained`` of the trained model plus its tokenizer, appearing at ``destination`` complete or not at all.

    Every process takes part in gathering the full state dict (FSDP shards it); the main process loads it into a
    plain ``ParcaeForCausalLM`` built on the meta device (FSDP turns the trained module into a torch-generated
    subclass, whose source file ``save_pretrained`` would copy as remote code) and writes through a staging folder.
    """
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with torch.device("meta"):
            plain = ParcaeForCausalLM(accelerator.unwrap_model(model).config)
        plain.load_state_dict(state, strict=True, assign=True)
        plain.tie_weights()
        with atomic_directory(destination, overwrite=True) as staging:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    accelerator.wait_for_everyone()
