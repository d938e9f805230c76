"""FSDP2 with the official two-optimizer routing, on GPUs and on CPU processes (gloo) alike.

Two gaps of Accelerate are closed here. It turns an FSDP launch into FSDP only on GPU-like devices
(``AcceleratorState`` checks the device list): with ``cpu=True`` it silently falls back to multi-CPU data parallelism
and ignores the plugin, although PyTorch's ``fully_shard`` runs on a CPU device mesh over gloo; so the plugin that
``accelerate launch`` described (``ACCELERATE_USE_FSDP``/``FSDP_*``) is put back into the state by hand. And its FSDP
checkpointing pairs optimizer ``i`` with model ``i``, so Muon + AdamW on one model are saved through torch's
distributed state-dict API instead (:class:`ShardedOptimizerState`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
)


def fsdp_requested() -> bool:
    """True when ``accelerate launch`` was given an FSDP configuration."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Make ``accelerator.prepare`` shard the model with FSDP on CPU processes, as it would on GPUs.

    Call right after building the Accelerator, before ``prepare``. Only needed (and only done) when FSDP was requested
    and Accelerate chose multi-CPU data parallelism instead.
    """
    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables written by `accelerate launch`
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


class ShardedOptimizerState:
    """The Muon and AdamW states of an FSDP model, saved with each checkpoint (``register_for_checkpointing``).

    Accelerate's FSDP checkpointing pairs optimizer ``i`` with model ``i`` and so cannot save two optimizers of one
    model; torch's distributed state-dict API can. The states are gathered into one full, parameter-name-keyed dict on
    save (written by the main process) and re-sharded on load, so a checkpoint does not depend on the number of
    processes.
    """

    def __init__(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]):
        self.model = model
        self.optimizers = optimizers

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizers, options=_FULL_ON_CPU)

    def load_state_dict(self, state: dict) -> None:
        # strict=False: parameters that never receive a gradient in some layouts (parameters_without_gradient in
        # loop.py) have no optimizer state to restore
        set_optimizer_state_dict(self.model, self.optimizers, state,
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False))


_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def prepare_model_and_optimizers(
    accelerator: Accelerator, model: torch.nn.Module,
    build_optimizers: Callable[[torch.nn.Module], list[torch.optim.Optimizer]],
) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    """``accelerator.prepare`` for the model and its optimizers (Muon + AdamW).

    Under FSDP the optimizers are built on the sharded parameters after ``prepare`` (each Muon matrix is then a
    ``DTensor`` sharded by rows; Muon's Newton-Schulz products on it are global matrix products, so the update is the
    one of the full matrix) and checkpointed through :class:`ShardedOptimizerState`.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        model, *optimizers = accelerator.prepare(model, *build_optimizers(model))
        return model, optimizers
    model = accelerator.prepare(model)
    optimizers = build_optimizers(model)
    accelerator.register_for_checkpointing(ShardedOptimizerState(model, optimizers))
    return model, optimizers
