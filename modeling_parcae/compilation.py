"""Regional compilation: every Parcae block compiled once and reused by every loop, loop count and sampled depth.

``torch.compile`` of the whole model traces ``prelude + num_loops x core + coda`` blocks into one graph: the compile
time grows with the loop count, and every new loop count (every Poisson depth a training step samples) recompiles.
The looped core is the same computation in every loop, so compiling the *block* instead gives one graph per kind of
block call (with or without a value embedding, with or without gradient), whatever the depth.

Two details make that hold:

* blocks are compiled in place (an instance ``forward``): the module tree, the ``state_dict`` keys and the module
  hooks of DDP and FSDP2 stay as they are, and the hooks run outside the compiled graph;
* the block never sees which cache slot it writes. Each block execution writes its own slot, a Python int that
  differs per loop; inside the graph it would be a guard, i.e. one recompile per slot (the reason transformers'
  layers, which index the cache by ``layer_idx``, recompile per layer when compiled one by one). The block gets a
  view of its slot instead: for transformers' plain layers (``DynamicLayer``, ``StaticLayer``) of a ``Cache`` whose
  ``update`` is transformers' own, a :class:`_LayerView` traced into the graph — every slot's layer looks alike to
  dynamo, so one graph serves all; for any other cache (offloading, quantized or sliding layers, caches that remap
  slots) a :class:`_SlotView`, whose ``update`` writes the slot eagerly: the graph breaks there and resumes after it.

Accelerate's ``compile_regions`` is not used: it also compiles every other leaf module (a ``ModuleDict`` of value
embeddings cannot be indexed once wrapped) and copies the blocks; transformers has no regional compilation of its
own for inference. ``generate`` compiles the whole forward by itself for a static cache on GPU; pass
``disable_compile=True`` to keep the regional one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

# graphs per compiled code object before dynamo gives up and runs eagerly: the block graphs multiply with value
# embedding or not, grad mode, cache or not, prefill or decode shapes and kept positions (the official recipe also
# raises it to 64)
_RECOMPILE_LIMIT = 64


class _SlotView:
    """The KV cache as one block execution sees it: ``update`` writes slot ``slot``, eagerly (a graph break)."""

    def __init__(self, cache: Cache, slot: int):
        self.cache, self.slot = cache, slot

    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)


class _LayerView:
    """One slot's ``DynamicLayer`` / ``StaticLayer`` behind the cache's ``update`` signature, traced into the block's
    graph."""

    def __init__(self, layer: DynamicLayer | StaticLayer):
        self.layer = layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.update(key_states, value_states, *args, **kwargs)


def _slot_view(cache: Cache, slot: int) -> _LayerView | _SlotView:
    """What the compiled block gets for ``cache``: a traced view of a plain transformers layer, else an eager one."""
    layers = getattr(cache, "layers", None)
    plain = (type(cache).update is Cache.update and not getattr(cache, "offloading", False) and layers is not None
             and slot < len(layers) and type(layers[slot]) in (DynamicLayer, StaticLayer))
    return _LayerView(layers[slot]) if plain else _SlotView(cache, slot)


class _CompiledBlockForward:
    """A block's ``forward``: the compiled class ``forward``, called with a view of the block's cache slot."""

    def __init__(self, block: nn.Module, compiled_forward):
        self.block, self.compiled_forward = block, compiled_forward

    def __call__(self, *args, **kwargs):
        if kwargs.get("cache") is not None:
            kwargs["cache"] = _slot_view(kwargs["cache"], kwargs.get("cache_slot"))
            kwargs["cache_slot"] = 0  # the slot lives in the view: one constant for every execution
        return self.compiled_forward(self.block, *args, **kwargs)


def parcae_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks (prelude, core and coda) of a Parcae model, also inside wrappers (DDP, PEFT) and for
    classes loaded as remote code (matched by class name)."""
    return [module for module in model.modules() if type(module).__name__.endswith("ParcaeDecoderLayer")]


def compile_blocks(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None, fullgraph: bool = False) -> nn.Module:
    """Compile each Parcae block in place (regional compilation); returns ``model`` itself.

    Call it before ``accelerator.prepare`` / ``Trainer(...)``, instead of ``TrainingArguments(torch_compile=True)`` (a
    whole-model compile, which would trace through these graphs; in training it compiles the loop's stages).
    ``dynamic=False`` suits training (fixed shapes, as the official recipe); the default lets a decode step's growing
    cache length become a dynamic dimension after the first recompile instead of one graph per length.
    ``fullgraph=True`` fails on a cache written eagerly (see the module docstring). Idempotent: a compiled block is
    compiled again with the new settings.
    """
    blocks = parcae_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ParcaeDecoderLayer blocks to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    compiled = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=backend, mode=mode, dynamic=dynamic,
                                          fullgraph=fullgraph)
        block.forward = _CompiledBlockForward(block, compiled[cls])
    return model


def blocks_are_compiled(model: nn.Module) -> bool:
    """True when every Parcae block of ``model`` runs through :func:`compile_blocks`."""
    blocks = parcae_blocks(model)
    return bool(blocks) and all(isinstance(block.__dict__.get("forward"), _CompiledBlockForward) for block in blocks)


def compile_loss(model: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                 dynamic: bool | None = None) -> nn.Module:
    """Compile the model's loss function (logits -> cross-entropy) in place; returns ``model`` itself.

    Eagerly, transformers' ``ForCausalLMLoss`` makes a float32 copy of the B x T x V logits and log-softmax keeps a
    second one for the backward (2 GiB each at 8 x 2048 x 32768), then the backward writes two more: the loss costs
    the step several passes over the largest tensors it has. Compiled, the upcast, log-softmax and target gather fuse
    into per-row reductions over the logits as they are, and the backward writes the logits' gradient in one pass.
    ``compile_blocks`` leaves the head and loss eager; ``parcae train --compile`` calls both. ``dynamic=None`` (the
    default) suits Trainer's varying sequence lengths; ``dynamic=False`` fixed-length rows. Idempotent.
    """
    if not isinstance(getattr(type(model), "loss_function", None), property):
        raise ValueError(f"{type(model).__name__} has no loss_function to compile (pass the transformers model, "
                         "not a wrapper)")
    loss_function = model.loss_function
    loss_function = getattr(loss_function, "uncompiled", loss_function)  # compiled before: compile the original
    model.loss_function = torch.compile(loss_function, backend=backend, mode=mode, dynamic=dynamic)
    model.loss_function.uncompiled = loss_function
    return model
