"""A KV cache for looped models: one slot per *executed* block, laid out so the slot map never moves.

A looped core runs the same physical blocks ``num_loops`` times; each execution attends to its own keys/values from
earlier tokens, so the cache needs ``prelude + num_loops * core + coda`` slots (transformers' default cache has one
per configured layer and breaks — see docs/generation.md). Slots: prelude ``i`` -> ``i``; coda ``i`` -> ``P + i``;
core block ``j`` of loop ``r`` -> ``P + C + r * R + j`` (``ParcaeConfig.base_cache_slot`` gives loop 0's slot and
``ParcaeDecoderLayer.cache_slot`` the rest). Prelude and coda slots do not depend on the loop count.

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

import dataclasses

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticCache, StaticLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration_parcae import ParcaeConfig, validate_num_loops


# transformers 5.24 renamed the cache argument of ``forward``/``generate`` and the output field from
# ``past_key_values`` to ``cache`` (5.23 knows only the old name; 5.24 still accepts it, with a deprecation warning).
# The installed release's name, read from its output class, so that one file serves both.
CACHE_ARGUMENT = ("cache" if "cache" in {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
                  else "past_key_values")


def resolve_cache_argument(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The one cache a forward was given under either name (``generate`` passes ``cache=`` from transformers 5.24)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the KV cache once: as cache= or as past_key_values=, not both")
    return cache if cache is not None else past_key_values


class ParcaeCache(Cache):
    """Dynamic (growing) KV cache with the looped slot layout, bound to one loop count.

    Using a cache built for ``num_loops=4`` in a forward with ``num_loops=8`` would read keys computed at another
    depth, so :meth:`check_num_loops` raises instead.
    """

    def __init__(self, config: ParcaeConfig, num_loops: int | None = None,
                 output_depths: tuple[int, ...] | None = None):
        num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(num_loops)
        self.num_loops = num_loops
        # a multi-depth forward (``output_depths``) runs the coda once per depth: one more coda slot set per extra depth
        self.output_depths = tuple(output_depths) if output_depths is not None else None
        extra_codas = len(self.output_depths) - 1 if self.output_depths else 0
        slots = config.num_cache_slots(num_loops) + extra_codas * config.num_coda_layers
        super().__init__(layers=[DynamicLayer() for _ in range(slots)])

    def check_num_loops(self, num_loops: int, output_depths: tuple[int, ...] | None = None) -> None:
        if num_loops != self.num_loops:
            raise ValueError(
                f"this ParcaeCache was built for num_loops={self.num_loops} but the forward runs num_loops={num_loops}; "
                "cached keys/values belong to a loop depth, so start a new cache (or pass the same num_loops)"
            )
        if output_depths != self.output_depths:
            raise ValueError(
                f"this ParcaeCache was built for output_depths={self.output_depths} but the forward asks for "
                f"output_depths={output_depths}; the coda slots belong to those depths, so start a new cache"
            )

    @staticmethod
    def coda_slot_offset(config: ParcaeConfig, num_loops: int, output_depths: tuple[int, ...], depth: int) -> int:
        """How far the coda slots of ``depth`` sit from the ordinary coda slots: the deepest uses the ordinary ones,
        the k-th other depth of ``output_depths`` the k-th extra coda slot set after the core slots."""
        if depth == num_loops:
            return 0
        k = [d for d in output_depths if d != num_loops].index(depth)
        return config.num_cache_slots(num_loops) + k * config.num_coda_layers - config.num_prelude_layers

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values of every slot."""
        total = 0
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


class ParcaeSharedLoopCache(ParcaeCache):
    """KV memory that does not grow with ``num_loops``: the core blocks keep one slot each, shared by all loops.

    Rule (an approximation, selected per ``generate`` call with ``past_key_values=ParcaeSharedLoopCache(config,
    num_loops=N)``): within one forward, loop ``r`` of the new tokens attends to the new tokens' own loop-``r``
    keys/values, exactly as without a cache; what is *stored* for later tokens is only the last loop's keys/values,
    so every loop of a later token reads the earlier tokens' last-loop keys/values. Slots: prelude ``P``, coda ``C``,
    core ``R``, i.e. the layout of ``num_loops=1`` whatever ``num_loops`` is. Prefill is exact; decoding differs
    from the exact cache wherever a loop's keys/values differ from the last loop's (measured in docs/generation.md).
    """

    def __init__(self, config: ParcaeConfig, num_loops: int | None = None):
        super().__init__(config, num_loops=1)
        self.num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(self.num_loops)
        self.first_core_slot = config.num_prelude_layers + config.num_coda_layers
        self.num_core_layers = config.num_core_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx < self.first_core_slot or self.num_core_layers == 0:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        loop, block = divmod(layer_idx - self.first_core_slot, self.num_core_layers)
        slot = self.first_core_slot + block
        if loop == self.num_loops - 1:
            return super().update(key_states, value_states, slot, *args, **kwargs)
        layer = self.layers[slot]
        if not layer.is_initialized or layer.keys.numel() == 0:
            return key_states, value_states
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


class ParcaeStaticCache(ParcaeCache, StaticCache):
    """Pre-allocated KV cache with the looped slot layout: ``prelude + num_loops * core + coda`` transformers
    ``StaticLayer`` slots of ``max_cache_len`` positions each, written in place.

    Fixed shapes and addresses make the decode step compilable (``torch.compile``, CUDA graphs). It is a
    ``StaticCache`` for ``generate``'s purposes; ``generate(cache_implementation="static")`` builds one.
    """

    def __init__(self, config: ParcaeConfig, max_cache_len: int, num_loops: int | None = None):
        num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(num_loops)
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.num_loops = num_loops
        self.output_depths = None
        self.max_cache_len = max_cache_len
        # Cache.__init__ directly: StaticCache.__init__ would lay out one slot per configured layer
        Cache.__init__(self, layers=[StaticLayer(max_cache_len) for _ in range(config.num_cache_slots(num_loops))])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and not torch.compiler.is_compiling():
            cached = int(self.get_seq_length())
            if cached + key_states.shape[-2] > self.max_cache_len:
                raise ValueError(f"ParcaeStaticCache holds {self.max_cache_len} positions: {cached} cached + "
                                 f"{key_states.shape[-2]} new do not fit; build it with a larger max_cache_len")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


__all__ = ["ParcaeCache", "ParcaeSharedLoopCache", "ParcaeStaticCache"]
