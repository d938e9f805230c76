"""Per-token adaptive depth (``exit_threshold``): a token stops looping once its state has converged, and its compute
stops too. :class:`ExitPolicy` is a depth policy of ``ParcaeModel``'s one loop (the other is ``LoopSchedule``): it
packs the tokens still active, and keeps each core block's newest keys/values of every token so that later tokens
(and the cache) read an exited token's last computed loop. The rule and its guarantees: docs/generation.md.

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

from __future__ import annotations

import torch


class _Packing:
    """The active tokens of one loop, left-packed per batch row: ``rows`` (batch row of each packed row) and
    ``tokens`` (rows, width) token indices, -1 for packing slack."""

    def __init__(self, active: torch.Tensor):
        self.rows = active.any(-1).nonzero().squeeze(-1)
        counts = active[self.rows].sum(-1)
        width = int(counts.max())
        order = torch.sort((~active[self.rows]).long(), dim=-1, stable=True).indices[:, :width]
        self.tokens = torch.where(torch.arange(width, device=active.device)[None] < counts[:, None], order, -1)
        self.valid = self.tokens >= 0
        self.valid_rows = self.rows[:, None].expand_as(self.tokens)[self.valid]
        self.valid_tokens = self.tokens[self.valid]
        self.shape = active.shape

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, seq_len, ...) -> (rows, width, ...)."""
        return tensor[self.rows[:, None], self.tokens.clamp(min=0)]

    def scatter(self, full: torch.Tensor, packed: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
        """A copy of ``full`` with the packed tokens' entries replaced (``token_dim``: where tokens sit in both)."""
        full, packed = full.movedim(token_dim, 1).clone(), packed.movedim(token_dim, 1)
        full[self.valid_rows, self.valid_tokens] = packed[self.valid]
        return full.movedim(1, token_dim)

    def unpack_attention(self, weights: torch.Tensor) -> torch.Tensor:
        """Packed attention maps (rows, heads, width, keys) as (batch, heads, seq_len, keys), zero for idle tokens."""
        full = weights.new_zeros(self.shape[0], weights.shape[1], self.shape[1], weights.shape[-1])
        full[self.valid_rows, :, self.valid_tokens] = weights.transpose(1, 2)[self.valid]
        return full


class LatestKeysValues:
    """The ``BlockCache`` the core blocks get while tokens exit (``cache_parcae.BlockCache``): keeps the newest keys/values of every token of
    this forward, writes them to the real cache slot (if any) and returns the keys/values the packed queries see."""

    def __init__(self, cache):
        self.cache = cache
        self.latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # core block index -> (B, heads, T, D) each
        self.slots: list[int] = []  # this loop's slot of each core block
        self.packing: _Packing | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, cache_slot: int, *args, **kwargs):
        block = self.slots.index(cache_slot)
        if self.packing is None:  # every token active: the block's own keys/values are the newest of all tokens
            self.latest[block] = (key, value)
        else:
            self.latest[block] = tuple(self.packing.scatter(old, new, token_dim=2)
                                       for old, new in zip(self.latest[block], (key, value)))
        key, value = self.latest[block]
        if self.cache is not None:
            key, value = self.cache.update(key, value, cache_slot)
        if self.packing is not None:
            key, value = key[self.packing.rows], value[self.packing.rows]
        return key, value

    def fill(self, slots: list[int]) -> None:
        """A loop nobody runs still fills its cache slots with every token's newest keys/values."""
        if self.cache is not None:
            for block, slot in enumerate(slots):
                self.cache.update(*self.latest[block], slot)


def _packed_mask(packing: _Packing, key_valid: torch.Tensor, past_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (rows, 1, width, past + T): a packed query at token ``t`` sees valid keys up to ``past + t``;
    packing slack sees everything (its output is discarded) so that no softmax row is empty."""
    tokens = packing.tokens
    key_index = torch.arange(key_valid.shape[-1], device=tokens.device)
    allowed = (key_index[None, None, :] <= past_length + tokens[..., None]) & key_valid[packing.rows][:, None, :]
    allowed = allowed | (tokens < 0)[..., None]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


class ExitPolicy:
    """The exit rule as a depth policy of the model's loop: ``begin`` hands the loop the tokens still active (all of
    them, or a packed subset with its own mask, rotary tables and value embeddings), ``end`` merges their new states
    and applies the rule. ``loops_run`` are the loops each token ran, ``(batch, seq_len)``."""

    def __init__(self, num_loops: int, exit_threshold: float, attention_mask: torch.Tensor | None, past_length: int):
        self.num_loops = num_loops
        self.exit_threshold = exit_threshold
        self.padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        self.past_length = past_length
        self.active: torch.Tensor | None = None
        self.loops_run: torch.Tensor | None = None
        self.latest: LatestKeysValues | None = None

    def with_grad(self, loop: int) -> bool:
        return False

    def begin(self, loop: int, step, slots: list[int]):
        kwargs = step.block_kwargs
        if self.active is None:  # first loop: every token runs
            batch, seq_len = step.state.shape[:2]
            self.active = torch.ones(batch, seq_len, dtype=torch.bool, device=step.state.device)
            self.loops_run = torch.zeros(batch, seq_len, dtype=torch.long, device=step.state.device)
            self.latest = LatestKeysValues(kwargs.get("cache"))
        self.latest.slots = slots
        n_active = int(self.active.sum()) if loop else self.active.numel()  # one host sync per loop decides the path
        if n_active == 0:
            self.latest.fill(slots)
            return None
        if n_active == self.active.numel():
            self.latest.packing = None
            return step._replace(block_kwargs={**kwargs, "cache": self.latest})
        packing = self.latest.packing = _Packing(self.active)
        cos, sin = kwargs["position_embeddings"]
        mask = _packed_mask(packing, self._key_valid(step.state), self.past_length, step.state.dtype)
        packed_kwargs = {**kwargs, "cache": self.latest, "attention_mask": mask,
                         "position_embeddings": (packing.pack(cos), packing.pack(sin)),
                         "unpack_attention_rows": packing.unpack_attention}
        return step._replace(state=packing.pack(step.state), embeds=packing.pack(step.embeds), precomputed=None,
                             value_embeddings={key: packing.pack(table) for key, table in step.value_embeddings.items()},
                             block_kwargs=packed_kwargs)

    def end(self, loop: int, state: torch.Tensor, new_state: torch.Tensor) -> torch.Tensor:
        if self.latest.packing is not None:
            new_state = self.latest.packing.scatter(state, new_state)
        self.loops_run += self.active
        if loop + 1 < self.num_loops:  # after the last loop nobody needs the rule
            change = (new_state - state).float().norm(dim=-1) / new_state.float().norm(dim=-1).clamp_min(1e-30)
            self.active = self.active & (change >= self.exit_threshold)
        return new_state  # exited tokens were copied unchanged into ``new_state``

    def _key_valid(self, state: torch.Tensor) -> torch.Tensor:
        """Which keys (past + new) are real tokens, from the 2-D padding mask the model was given (a mask over the
        new tokens alone leaves the cached ones valid)."""
        valid = torch.ones(state.shape[0], self.past_length + state.shape[1], dtype=torch.bool, device=state.device)
        if self.padding_mask is not None:
            valid[:, valid.shape[1] - self.padding_mask.shape[1]:] = self.padding_mask.bool()
        return valid
