"""An integer ``logits_to_keep`` also trims the last block: positions whose logits are dropped skip its attention
queries and MLP, and every position's keys/values still reach the cache. The kept logits must equal the same
positions of a full forward, with padding, under a depth sweep, and when a cached continuation reads the trimmed
forward's cache."""

import pytest
import torch

from transformers import DynamicCache
from tests.conftest import tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(batch: int = 3, length: int = 12, pad: int = 4):
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0  # left padding in the first row
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("keep", [1, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_kept_logits_equal_the_full_forward(attn: str, keep: int, padded: bool):
    model = tiny_model(attn_implementation=attn)
    ids, mask = _inputs()
    mask = mask if padded else None
    with torch.no_grad():
        full = model(ids, attention_mask=mask, num_loops=3).logits
        kept = model(ids, attention_mask=mask, num_loops=3, logits_to_keep=keep).logits
    assert kept.shape[1] == keep
    torch.testing.assert_close(kept, full[:, -keep:], **TOL)


def test_the_last_block_runs_only_the_kept_positions():
    model = tiny_model()
    ids, _ = _inputs()
    seen = []
    last_mlp = model.model.coda[-1].mlp
    handle = last_mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            model(ids, num_loops=2, logits_to_keep=2)
            model(ids, num_loops=2)
    finally:
        handle.remove()
    assert seen == [2, ids.shape[1]]


def test_kept_depth_logits_equal_the_full_sweep():
    model = tiny_model()
    ids, mask = _inputs()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, output_depths=(1, 2, 4)).depth_logits
        kept = model(ids, attention_mask=mask, output_depths=(1, 2, 4), logits_to_keep=3).depth_logits
    for depth_full, depth_kept in zip(full, kept):
        torch.testing.assert_close(depth_kept, depth_full[:, -3:], **TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_trimmed_prefill_caches_every_position(attn: str):
    """The continuation after a ``logits_to_keep=1`` prefill attends to every prompt position's keys/values."""
    model = tiny_model(attn_implementation=attn)
    ids, mask = _inputs(length=14)
    prompt, rest = ids[:, :10], ids[:, 10:]
    with torch.no_grad():
        full = model(ids, attention_mask=mask, num_loops=3, use_cache=False).logits
        cache = DynamicCache()
        first = model(prompt, attention_mask=mask[:, :10], num_loops=3, past_key_values=cache, logits_to_keep=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, 10:]
        after = model(rest, attention_mask=mask, position_ids=positions, num_loops=3, past_key_values=cache).logits
    torch.testing.assert_close(first.logits[:, 0], full[:, 9], **TOL)
    torch.testing.assert_close(after, full[:, 10:], **TOL)


def test_attention_maps_and_hidden_states_keep_every_position():
    model = tiny_model(attn_implementation="eager")
    ids, _ = _inputs()
    with torch.no_grad():
        out = model(ids, num_loops=2, logits_to_keep=1, output_attentions=True, output_hidden_states=True)
    assert out.logits.shape[1] == 1
    assert out.attentions[-1].shape[-2] == ids.shape[1]
    assert out.hidden_states[-1].shape[1] == ids.shape[1]


def test_bad_positions_to_keep_is_refused():
    model = tiny_model()
    ids, _ = _inputs()
    with pytest.raises(ValueError, match="positions_to_keep"):
        model.model(ids, positions_to_keep=-1)
