"""Where each executed block keeps its keys and values, over transformers' own caches (docs/architecture.md).

A looped core runs its blocks ``num_loops`` times, so a forward needs one cache layer per *executed* block:
:class:`ParcaeSlotMap` numbers them, and is the only place that does; :func:`prepare_cache` grows any transformers
``Cache`` to that count and stamps it with the loop layout, so that keys/values cached at one depth are never read at
another. :class:`ParcaeSharedLoopCache` is the one cache of our own: bounded KV memory.

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers.cache_utils import Cache, DynamicCache


@runtime_checkable
class BlockCache(Protocol):
    """What a block's attention writes its new keys and values to (``layer_idx``: the execution's cache slot) and
    gets back the keys and values its queries attend to. A transformers ``Cache`` is one, and the only one on the
    main route. Two side routes hand a block a view instead, each a class of its own with this one method:
    ``compilation._LayerView`` / ``_SlotView`` (a compiled block sees its own slot, so one graph serves every slot)
    and ``adaptive_parcae.LatestKeysValues`` (under adaptive exit: the newest keys and values of every token)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class ParcaeSlotMap:
    """The cache slot of every block execution of one forward, in execution order: prelude ``i`` -> ``i``; core block
    ``j`` of loop ``r`` -> ``P + r * R + j``; coda ``i`` -> ``P + T * R + i``, then a coda set per extra read-out depth."""

    num_prelude_layers: int
    num_core_layers: int
    num_coda_layers: int
    num_loops: int
    output_depths: tuple[int, ...] | None = None

    @classmethod
    def for_config(cls, config, num_loops: int, output_depths: tuple[int, ...] | None = None) -> "ParcaeSlotMap":
        return cls(config.num_prelude_layers, config.num_core_layers, config.num_coda_layers, num_loops, output_depths)

    @property
    def num_slots(self) -> int:
        return self.coda(self.num_coda_layers, self.num_depths - 1)  # one past the last coda slot

    @property
    def num_depths(self) -> int:
        return len(self.output_depths) if self.output_depths else 1

    def prelude(self, index: int) -> int:
        return index

    def core(self, loop: int, index: int) -> int:
        return self.num_prelude_layers + loop * self.num_core_layers + index

    def coda(self, index: int, depth_rank: int = 0) -> int:
        """``depth_rank`` 0 is the deepest read-out (``num_loops``); rank k the k-th other depth of ``output_depths``."""
        return self.core(self.num_loops, 0) + depth_rank * self.num_coda_layers + index

    def depth_rank(self, depth: int) -> int:
        if depth == self.num_loops:
            return 0
        return 1 + [d for d in self.output_depths if d != self.num_loops].index(depth)

    def shared(self, slot: int) -> tuple[int, bool]:
        """The bounded layout of :class:`ParcaeSharedLoopCache`: every loop of core block ``j`` shares one slot, which
        only the last loop writes. Returns ``(slot in that layout, whether this execution stores its keys/values)``."""
        first_core, first_coda = self.core(0, 0), self.coda(0)
        if slot < first_core:
            return slot, True
        if slot >= first_coda:
            return slot - first_coda + first_core + self.num_core_layers, True
        loop, index = divmod(slot - first_core, self.num_core_layers)
        return first_core + index, loop == self.num_loops - 1


def prepare_cache(cache: Cache, slot_map: ParcaeSlotMap) -> None:
    """Bind ``cache`` to the forward's slot map: stamp a fresh cache with it and grow it to one layer per slot; a
    filled cache must carry the same map (its keys/values belong to that depth)."""
    if getattr(cache, "offloading", False) and not torch.cuda.is_available():
        raise ValueError("an offloaded cache (cache_implementation='offloaded' or 'offloaded_static') moves layers "
                         "between a CUDA device and the CPU with CUDA streams, and this machine has no CUDA device: "
                         "use the default cache here")
    if isinstance(cache, ParcaeSharedLoopCache) and slot_map.output_depths:
        raise ValueError("output_depths cannot use ParcaeSharedLoopCache (a depth would read the deepest loop's keys "
                         "and values, not its own last loop's): use the default cache, or one depth per run")
    stamped = getattr(cache, "parcae_slot_map", None)
    if stamped is not None:
        if stamped != slot_map:
            raise ValueError(
                f"this cache holds keys/values of num_loops={stamped.num_loops}, output_depths={stamped.output_depths}, "
                f"but the forward runs num_loops={slot_map.num_loops}, output_depths={slot_map.output_depths}: cached "
                "keys/values belong to a loop depth, so start a new cache (or pass the same num_loops)")
        return
    if cache.get_seq_length() > 0:
        raise ValueError("this cache was filled by another model or outside a Parcae forward; start a new cache")
    cache.parcae_slot_map = slot_map
    wanted = (slot_map.shared(slot_map.num_slots - 1)[0] + 1 if isinstance(cache, ParcaeSharedLoopCache)
              else slot_map.num_slots)
    if cache.layer_class_to_replicate is None and cache.layers:
        # transformers built one layer per physical block; copies of an empty one are empty layers of the same kind
        cache.layers.extend(copy.deepcopy(cache.layers[-1]) for _ in range(wanted - len(cache.layers)))


def cache_memory_bytes(cache: Cache) -> int:
    """Bytes held by the cached keys and values of every layer of ``cache``."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class ParcaeSharedLoopCache(DynamicCache):
    """KV memory that does not grow with ``num_loops``: the core blocks keep one slot each, shared by all loops.

    Rule (an approximation, selected per ``generate`` call with ``cache=ParcaeSharedLoopCache()``): within one
    forward, loop ``r`` of the new tokens attends to the new tokens' own loop-``r`` keys/values, exactly as without a
    cache; what is *stored* for later tokens is only the last loop's keys/values, so every loop of a later token reads
    the earlier tokens' last-loop keys/values. Prefill is exact; decoding differs from the exact cache wherever a
    loop's keys/values differ from the last loop's (measured in docs/generation.md).
    """

    parcae_slot_map: ParcaeSlotMap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slot, stores = self.parcae_slot_map.shared(layer_idx)
        if stores:
            return super().update(key_states, value_states, slot, *args, **kwargs)
        layer = self.layers[slot] if slot < len(self.layers) else None
        if layer is None or not layer.is_initialized or layer.keys.numel() == 0:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


__all__ = ["BlockCache", "ParcaeSharedLoopCache", "ParcaeSlotMap", "cache_memory_bytes", "prepare_cache"]
