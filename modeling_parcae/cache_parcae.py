"""A KV cache for looped models: one slot per *executed* block, laid out so the slot map never moves.

A looped core runs the same physical blocks ``num_loops`` times; each execution attends to its own keys/values from
earlier tokens, so the cache needs ``prelude + num_loops * core + coda`` slots (transformers' default cache has one
per configured layer and breaks — see docs/generation.md). Slots: prelude ``i`` -> ``i``; coda ``i`` -> ``P + i``;
core block ``j`` of loop ``r`` -> ``P + C + r * R + j`` (``ParcaeConfig.base_cache_slot`` gives loop 0's slot and
``ParcaeDecoderLayer.cache_slot`` the rest). Prelude and coda slots do not depend on the loop count.

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .configuration_parcae import ParcaeConfig, validate_num_loops


class ParcaeCache(Cache):
    """Dynamic (growing) KV cache with the looped slot layout, bound to one loop count.

    Using a cache built for ``num_loops=4`` in a forward with ``num_loops=8`` would read keys computed at another
    depth, so :meth:`check_num_loops` raises instead.
    """

    def __init__(self, config: ParcaeConfig, num_loops: int | None = None):
        num_loops = config.num_loops if num_loops is None else num_loops
        validate_num_loops(num_loops)
        self.num_loops = num_loops
        super().__init__(layers=[DynamicLayer() for _ in range(config.num_cache_slots(num_loops))])

    def check_num_loops(self, num_loops: int) -> None:
        if num_loops != self.num_loops:
            raise ValueError(
                f"this ParcaeCache was built for num_loops={self.num_loops} but the forward runs num_loops={num_loops}; "
                "cached keys/values belong to a loop depth, so start a new cache (or pass the same num_loops)"
            )

    def memory_bytes(self) -> int:
        """Bytes held by the cached keys and values of every slot."""
        total = 0
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


__all__ = ["ParcaeCache"]
