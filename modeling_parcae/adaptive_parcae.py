"""Per-token adaptive depth: a token stops looping once its recurrent state has converged, and its compute stops too.

Rule: after each loop ``r`` the relative change of a token's state ``||h_r - h_{r-1}|| / ||h_r||`` (float32, over the
state channels) is compared with ``exit_threshold``; below it, the token exits and keeps ``h_r`` as its final state.
Every token runs at least one loop and at most ``num_loops``; a threshold of 0 never exits (the change is never < 0).

Compute is saved, not masked: in a loop where some tokens have exited, the rows that still have active tokens are
gathered, their active tokens packed to the left, and only those run the core blocks (projections, MLP, attention
queries); the new states are scattered back. A loop where every token is active runs the ordinary batched path, so a
threshold that never fires gives exactly the fixed-depth result.

What later tokens attend to for loops a token skipped: the keys/values of its last computed loop. Each core block
keeps the newest keys/values of every token of the forward; exited tokens' entries stay as they were, and that
buffer is what loop ``r`` writes into its cache slot, so every slot of every token is filled, and a cached decode
reads exactly what an uncached forward over the whole sequence attends to (cached == uncached under the rule).

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache_parcae import CACHE_ARGUMENT


def validate_exit_threshold(exit_threshold: float) -> float:
    if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float)) or exit_threshold < 0:
        raise ValueError(f"exit_threshold must be a number >= 0 (0 never exits early), got {exit_threshold!r}")
    return float(exit_threshold)


class _LatestKeysValues:
    """Stands in for the cache inside one core block while tokens exit: keeps the newest keys/values of every token of
    this forward, writes them to the real cache slot (if any) and returns the keys/values the packed queries see."""

    def __init__(self, cache):
        self.cache = cache
        self.latest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block index -> (B, heads, T, D) each
        self.block = 0
        self.rows: torch.Tensor | None = None  # packed mode: batch row of each packed row
        self.tokens: torch.Tensor | None = None  # packed mode: (rows, Q) token index, -1 for packing slack

    def update(self, key: torch.Tensor, value: torch.Tensor, cache_slot: int, *args, **kwargs):
        if self.rows is None:  # every token active: the block's own keys/values are the newest of all tokens
            self.latest[self.block] = (key, value)
        else:
            latest_key, latest_value = (t.clone() for t in self.latest[self.block])
            valid = self.tokens >= 0
            rows = self.rows[:, None].expand_as(self.tokens)[valid]
            tokens = self.tokens[valid]
            latest_key[rows, :, tokens] = key.transpose(1, 2)[valid]
            latest_value[rows, :, tokens] = value.transpose(1, 2)[valid]
            self.latest[self.block] = (latest_key, latest_value)
        key, value = self.latest[self.block]
        if self.cache is not None:
            key, value = self.cache.update(key, value, cache_slot)
        if self.rows is not None:
            key, value = key[self.rows], value[self.rows]
        return key, value

    def fill_skipped(self, slots: list[int]) -> None:
        """A loop nobody runs still fills its cache slots with every token's newest keys/values."""
        if self.cache is not None:
            for block, slot in enumerate(slots):
                self.cache.update(*self.latest[block], slot)


def _packed_mask(tokens: torch.Tensor, key_valid: torch.Tensor, past_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (rows, 1, Q, past + T): a packed query at token ``t`` sees valid keys up to ``past + t``; packing
    slack sees everything (its output is discarded) so that no softmax row is empty."""
    key_index = torch.arange(key_valid.shape[-1], device=tokens.device)
    allowed = (key_index[None, None, :] <= past_length + tokens[..., None]) & key_valid[:, None, :]
    allowed = allowed | (tokens < 0)[..., None]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


def adaptive_iterate(
    model: nn.Module,
    state: torch.Tensor,
    embeds: torch.Tensor,
    num_loops: int,
    exit_threshold: float,
    value_embeddings: dict[str, torch.Tensor],
    block_kwargs: dict,
    attention_mask: torch.Tensor | None,
    past_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model.core`` up to ``num_loops`` times under the exit rule; returns the final states and the loops each
    token ran, ``(batch, seq_len)``.

    ``block_kwargs`` are the ordinary block arguments (the full causal mask, rotary tables, the cache); the packed
    path builds its own mask from ``attention_mask`` (2D, past + new, 1 = real token) and causality.
    """
    batch, seq_len = state.shape[:2]
    device = state.device
    cache = block_kwargs.get(CACHE_ARGUMENT)
    cos, sin = block_kwargs["position_embeddings"]
    extra = {k: v for k, v in block_kwargs.items() if k not in ("attention_mask", "position_embeddings",
                                                                 CACHE_ARGUMENT)}
    key_valid = (attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2
                 else torch.ones(batch, past_length + seq_len, dtype=torch.bool, device=device))
    latest = _LatestKeysValues(cache)
    precomputed = model.injection.precompute(embeds)  # loop-invariant (all-active loops; packed loops recompute)
    active = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    loops = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    for loop in range(num_loops):
        n_active = int(active.sum()) if loop else active.numel()  # one host sync per loop decides the path
        if n_active == 0:  # every token has exited: the remaining loops' cache slots get the newest keys/values
            for skipped in range(loop, num_loops):
                latest.fill_skipped([block.cache_slot(skipped) for block in model.core])
            break
        slots = [block.cache_slot(loop) for block in model.core]
        if n_active == active.numel():
            latest.rows = latest.tokens = None
            hidden = model.injection(state, embeds, precomputed)
            for index, block in enumerate(model.core):
                latest.block = index
                hidden = block(hidden, attention_mask=block_kwargs["attention_mask"], position_embeddings=(cos, sin),
                               cache_slot=slots[index], **{CACHE_ARGUMENT: latest},
                               value_embedding=value_embeddings.get(block.value_embedding_key), **extra)
            new_state = hidden
        else:
            rows = active.any(-1).nonzero().squeeze(-1)
            counts = active[rows].sum(-1)
            width = int(counts.max())
            # left-pack each row's active token indices; -1 marks slack
            order = torch.sort((~active[rows]).long(), dim=-1, stable=True).indices[:, :width]
            tokens = torch.where(torch.arange(width, device=device)[None] < counts[:, None], order, -1)
            gather = tokens.clamp(min=0)

            def pack(t: torch.Tensor) -> torch.Tensor:
                return t[rows[:, None], gather]

            latest.rows, latest.tokens = rows, tokens
            mask = _packed_mask(tokens, key_valid[rows], past_length, state.dtype)
            hidden = model.injection(pack(state), pack(embeds))
            for index, block in enumerate(model.core):
                latest.block = index
                table = value_embeddings.get(block.value_embedding_key)
                hidden = block(hidden, attention_mask=mask, position_embeddings=(pack(cos), pack(sin)),
                               cache_slot=slots[index], **{CACHE_ARGUMENT: latest},
                               value_embedding=None if table is None else pack(table), **extra)
            valid = tokens >= 0
            new_state = state.clone()
            new_state[rows[:, None].expand_as(tokens)[valid], tokens[valid]] = hidden[valid]
        loops += active
        if loop + 1 < num_loops:  # after the last loop nobody needs the rule
            change = (new_state - state).float().norm(dim=-1) / new_state.float().norm(dim=-1).clamp_min(1e-30)
            active = active & (change >= exit_threshold)
        state = new_state  # exited tokens were copied unchanged into ``new_state``
    return state, loops
