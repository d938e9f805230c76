"""Off the tested diagonal (issue 19): paths the other tests cover on one side only -- batch 1 and > 1, padded and
not, fp32 and half, eager and sdpa attention, cached and not (the list: the issue-19 note on coverage gaps).

Two paths that run different kernels are compared as docs/generation.md ("Equal across paths") states: logits within a
tolerance, greedy tokens equal up to a near tie (conftest helpers)."""

import copy

import pytest
import torch
from conftest import (
    assert_greedy_agrees, assert_logits_agree, exit_threshold_candidates, greedy_with_logits, threshold_with_margin,
    tiny_model,
)

pytestmark = pytest.mark.numerics

PROMPTS = [torch.tensor([5, 17, 99, 3, 250, 42, 7]), torch.tensor([8, 1, 64, 33])]


def _batch(rows: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` prompts, left-padded to one width when ``padded`` (else the first prompt repeated)."""
    prompts = PROMPTS[:rows] if padded else [PROMPTS[0]] * rows
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), 2)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# generate without an attention mask (tests/test_one_loop.py checks the static cache's forward with one)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("rows", [1, 2], ids=["b1", "b2"])
def test_static_cache_generation_without_a_mask_equals_the_dynamic_cache(attn, rows):
    """``generate(ids, cache_implementation="static")`` as the issue-19 report called it, no attention mask: prefill
    and every decode step within 1e-5 of the dynamic cache (a lone prefill query once attended unwritten slots)."""
    model = tiny_model(attn_implementation=attn)
    ids, _ = _batch(rows, padded=False)
    dynamic = greedy_with_logits(model, ids, num_loops=3, max_new_tokens=6)
    static = greedy_with_logits(model, ids, num_loops=3, max_new_tokens=6, cache_implementation="static")
    assert_greedy_agrees(*static, *dynamic, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# gaps closed: half precision with the cache, eager and sdpa while decoding, adaptive exit at batch 1 and with
# eager attention, beam search over a padded batch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_cached_generation_in_half_precision_agrees_with_uncached(dtype, atol):
    """The dtype checkpoints ship in: cached decoding's step logits within the half-precision rounding of the uncached
    forward's (about two bf16 / five fp16 units in the last place at this model's logit scale of 2-4), greedy tokens
    equal up to a near tie, at batch 1 and on a left-padded batch."""
    model = tiny_model().to(dtype)
    for rows, padded in ((1, False), (2, True)):
        ids, mask = _batch(rows, padded)
        kwargs = dict(num_loops=3, max_new_tokens=6, attention_mask=mask)
        cached = greedy_with_logits(model, ids, **kwargs)
        assert torch.isfinite(cached[1]).all()
        assert_greedy_agrees(*cached, *greedy_with_logits(model, ids, use_cache=False, **kwargs), atol=atol)


@pytest.mark.parametrize("rows,padded", [(1, False), (2, True)], ids=["b1", "b2-padded"])
def test_eager_and_sdpa_decode_agree(rows, padded):
    """Cached greedy decoding with eager attention and with sdpa: step logits within 1e-5."""
    ids, mask = _batch(rows, padded)
    runs = [greedy_with_logits(tiny_model(attn_implementation=attn), ids, attention_mask=mask, num_loops=3,
                               max_new_tokens=6) for attn in ("eager", "sdpa")]
    assert_greedy_agrees(*runs[1], *runs[0], atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_adaptive_exit_at_batch_1_and_with_eager_attention_equals_a_padded_batch(attn):
    """Under ``exit_threshold`` a prompt alone (batch 1, the all-active and packed paths on one row) scores what it
    scores in a left-padded batch, with either attention: loops per token equal where the exits are decided with a
    margin (conftest.threshold_with_margin), logits within 1e-5."""
    model = tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, mean_recurrence=8,
                       max_position_embeddings=64, attn_implementation=attn)
    ids, mask = _batch(2, True)

    def batched(threshold):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, num_loops=8, exit_threshold=threshold, use_cache=False)
        return out.num_loops, out.logits

    threshold = threshold_with_margin(batched, exit_threshold_candidates(model, ids, 8, mask))
    loops, logits = batched(threshold)
    assert len(loops[mask.bool()].unique()) > 1  # tokens exit at different depths
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            alone = model(prompt[None], num_loops=8, exit_threshold=threshold, use_cache=False)
        real = mask[row].bool()
        assert torch.equal(loops[row][real], alone.num_loops[0])
        assert_logits_agree(logits[row][real], alone.logits[0], atol=1e-5)


def test_beam_search_over_a_left_padded_batch_equals_each_prompt_alone():
    """Beam search with padding (the other beam tests run unpadded prompts of one length): the same beams, scored
    within 1e-9; float64, where near-equal beams cannot swap, so the comparison of beams is exact."""
    model = copy.deepcopy(tiny_model()).double()
    ids, mask = _batch(2, True)
    kwargs = dict(num_loops=3, num_beams=3, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=2,
                  return_dict_in_generate=True, output_scores=True)
    together = model.generate(ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert torch.equal(together.sequences[row, ids.shape[1]:], alone.sequences[0, len(prompt):]), row
        assert abs(float(together.sequences_scores[row] - alone.sequences_scores[0])) <= 1e-9, row
