"""Per-token adaptive depth (``exit_threshold``): a threshold of 0 is fixed depth exactly; cached decoding equals the
uncached forward under the rule; rows and tokens exit independently and equal each row run alone; exited tokens are
really not computed."""

import pytest
import torch

from modeling_parcae import ParcaeSlotMap

from conftest import (
    assert_greedy_agrees, assert_logits_agree, exit_threshold_candidates, greedy_with_logits, threshold_with_margin,
    tiny_model,
)

pytestmark = pytest.mark.numerics  # exit decisions and cross-path comparisons

LOOPS = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, mean_recurrence=LOOPS,
                      max_position_embeddings=64)


def test_threshold_zero_is_fixed_depth_exactly(model):
    ids = torch.randint(3, 288, (2, 10))
    mask = torch.tensor([[0, 0] + [1] * 8, [1] * 10])
    with torch.no_grad():
        fixed = model(ids, attention_mask=mask, num_loops=LOOPS, use_cache=False)
        adaptive = model(ids, attention_mask=mask, num_loops=LOOPS, exit_threshold=0.0, use_cache=False)
    assert torch.equal(adaptive.logits, fixed.logits)
    assert (adaptive.num_loops == LOOPS).all()
    prompt = ids[:1]
    with torch.no_grad():
        a = model.generate(prompt, num_loops=LOOPS, max_new_tokens=6, do_sample=False)
        b = model.generate(prompt, num_loops=LOOPS, exit_threshold=0.0, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_tokens_exit_at_different_depths_and_compute_is_saved(model):
    """Count the tokens each core block really processes: fewer than batch * tokens * loops."""
    ids = torch.randint(3, 288, (2, 12))
    threshold = exit_threshold_candidates(model, ids, LOOPS)[0]
    processed = []
    hooks = [block.register_forward_pre_hook(lambda m, args: processed.append(args[0].shape[:-1].numel()))
             for block in model.model.core]
    try:
        with torch.no_grad():
            out = model(ids, num_loops=LOOPS, exit_threshold=threshold, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    loops = out.num_loops
    assert loops.shape == ids.shape and int(loops.min()) >= 1 and int(loops.max()) <= LOOPS
    assert int(loops.min()) < LOOPS
    full = ids.numel() * LOOPS * len(model.model.core)
    assert sum(processed) < full
    # packing slack aside, the work tracks the loops actually run
    assert sum(processed) <= int(loops.sum()) * len(model.model.core) + full // 2


def test_cached_decoding_equals_uncached_under_the_rule(model):
    """Prefill 6 tokens, then feed the rest one at a time: loops per token equal one uncached forward over the whole
    sequence, and logits within 1e-5 (skipped loops' cache slots hold the token's last computed keys/values). The
    cached path runs other kernels (one query row), so the threshold is one that every exit clears by a relative
    margin of 1e-3 on the uncached path; a cache slot dropped or read at the wrong loop moves logits by far more."""
    ids = torch.randint(3, 288, (2, 14), generator=torch.Generator().manual_seed(0))

    def uncached(threshold):
        with torch.no_grad():
            out = model(ids, num_loops=LOOPS, exit_threshold=threshold, use_cache=False)
        return out.num_loops, out.logits

    threshold = threshold_with_margin(uncached, exit_threshold_candidates(model, ids, LOOPS))
    whole_loops, whole_logits = uncached(threshold)
    with torch.no_grad():
        step = model(ids[:, :6], num_loops=LOOPS, exit_threshold=threshold, use_cache=True)
        logits, loops = [step.logits], [step.num_loops]
        cache = step.cache
        for t in range(6, ids.shape[1]):
            step = model(ids[:, t: t + 1], num_loops=LOOPS, exit_threshold=threshold, cache=cache, use_cache=True)
            logits.append(step.logits)
            loops.append(step.num_loops)
    assert len(whole_loops.unique()) > 1  # tokens exit at different depths
    assert torch.equal(torch.cat(loops, dim=1), whole_loops)
    assert_logits_agree(torch.cat(logits, dim=1), whole_logits, atol=1e-5)
    assert len(cache.layers) == ParcaeSlotMap.for_config(model.config, LOOPS).num_slots
    assert all(layer.keys.shape[-2] == ids.shape[1] for layer in cache.layers)  # every slot of every token filled


def test_batch_rows_exit_independently_and_equal_each_row_alone(model):
    """Scoring and greedy generation of a left-padded batch equal each prompt run alone under the rule: loops per
    token equal, logits within 1e-5, greedy tokens equal up to a near tie. A row alone runs other kernels (other
    shapes), so the threshold is one that every exit of the batch -- prompts and generated tokens -- clears by a
    relative margin of 1e-3; a row leaking into another moves logits by far more."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 288, (n,), generator=generator) for n in (9, 5, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), 2), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                        for p in prompts])

    def batched(threshold):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, num_loops=LOOPS, exit_threshold=threshold, use_cache=False)
        tokens, logits = greedy_with_logits(model, ids, attention_mask=mask, num_loops=LOOPS,
                                            exit_threshold=threshold, max_new_tokens=8)
        return out.num_loops, out.logits, tokens, logits

    threshold = threshold_with_margin(batched, exit_threshold_candidates(model, ids, LOOPS, mask))
    loops, logits, tokens, token_logits = batched(threshold)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(prompt[None], num_loops=LOOPS, exit_threshold=threshold, use_cache=False)
        real = mask[row].bool()
        assert torch.equal(loops[row][real], alone.num_loops[0])
        assert_logits_agree(logits[row][real], alone.logits[0], atol=1e-5)
        alone_tokens, alone_logits = greedy_with_logits(model, prompt[None], num_loops=LOOPS,
                                                        exit_threshold=threshold, max_new_tokens=8)
        assert_greedy_agrees(tokens[row: row + 1], token_logits[row: row + 1], alone_tokens, alone_logits, atol=1e-5)
    per_row = [loops[row][mask[row].bool()].float().mean() for row in range(len(prompts))]
    assert len(set(round(float(x), 4) for x in per_row)) > 1  # rows really exit differently


def test_bad_exit_threshold_is_refused(model):
    ids = torch.randint(3, 288, (1, 4))
    for bad in (-0.1, "0.1", True):
        with pytest.raises(ValueError, match="exit_threshold"):
            model(ids, exit_threshold=bad, use_cache=False)
    with pytest.raises(ValueError, match="exit_threshold and output_depths"):
        model(ids, exit_threshold=0.1, output_depths=(1, 2), use_cache=False)


def test_loop_counter_counts_generated_tokens_only(model):
    """``parcae generate``'s loops-per-token figure reads the one-token decode steps; the prefill (whose last block
    keeps only the last position under ``logits_to_keep=1``) is not a generated token."""
    from modeling_parcae.generation_cli import LoopCounter

    ids = torch.randint(3, 288, (2, 6), generator=torch.Generator().manual_seed(3))
    counter = LoopCounter(model)
    model.generate(ids, num_loops=LOOPS, exit_threshold=0.0, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert counter.tokens == 2 * 4  # the first new token comes from the prefill
    assert counter.close() == LOOPS
