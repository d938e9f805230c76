"""One-pass multi-depth forward (``output_depths``): every depth's logits equal a separate run at that depth, with and
without padding, with a per-depth coda cache; ``parcae eval`` sweeps use it and give the per-depth results."""

import pytest
import torch

from conftest import assert_logits_agree, tiny_model

DEPTHS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, num_coda_layers=2,
                      max_position_embeddings=64)


def _separate(model, depth, **kwargs):
    with torch.no_grad():
        return model(num_loops=depth, use_cache=False, **kwargs).logits


def _assert_same(got, want, mask=None):
    if mask is not None:
        got, want = got[mask.bool()], want[mask.bool()]
    assert_logits_agree(got, want, atol=1e-5)


@pytest.mark.numerics
def test_every_depth_equals_a_separate_run(model):
    ids = torch.randint(3, 288, (2, 12))
    with torch.no_grad():
        out = model(ids, output_depths=DEPTHS, use_cache=False)
    assert len(out.depth_logits) == len(DEPTHS)
    for depth, logits in zip(DEPTHS, out.depth_logits):
        _assert_same(logits, _separate(model, depth, input_ids=ids))
    _assert_same(out.logits, _separate(model, 16, input_ids=ids))
    assert not torch.allclose(out.depth_logits[0], out.depth_logits[-1], atol=1e-3)  # depths really differ


@pytest.mark.numerics
def test_every_depth_equals_a_separate_run_with_padding(model):
    """Left padding (generation style) and right padding (scoring style) with an attention mask."""
    ids = torch.randint(3, 288, (3, 10))
    for mask in (torch.tensor([[0, 0, 0] + [1] * 7, [1] * 10, [0] * 5 + [1] * 5]),
                 torch.tensor([[1] * 7 + [0] * 3, [1] * 10, [1] * 4 + [0] * 6])):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_depths=(4, 1, 8), use_cache=False)
        for depth, logits in zip((4, 1, 8), out.depth_logits):
            _assert_same(logits, _separate(model, depth, input_ids=ids, attention_mask=mask), mask)


@pytest.mark.numerics
def test_cached_continuation_at_every_depth(model):
    """A prefix cached with ``output_depths`` (one coda slot set per depth) and continued gives each depth's logits
    of the whole sequence run uncached: the path ``parcae eval`` uses to share a few-shot prefix across options."""
    from transformers import DynamicCache

    from modeling_parcae import ParcaeSlotMap

    ids = torch.randint(3, 288, (2, 14))
    with torch.no_grad():
        first = model(ids[:, :9], output_depths=(2, 8), use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, DynamicCache)
        assert len(cache.layers) == ParcaeSlotMap.for_config(model.config, 8).num_slots + model.config.num_coda_layers
        cache.batch_select_indices(torch.tensor([0, 0, 1]))  # two options of item 0, one of item 1
        rows = ids[[0, 0, 1]].clone()
        rows[1, 9:] = torch.randint(3, 288, (5,))
        second = model(rows[:, 9:], output_depths=(2, 8), past_key_values=cache, use_cache=True)
    for depth, logits in zip((2, 8), second.depth_logits):
        _assert_same(logits, _separate(model, depth, input_ids=rows)[:, 9:])


def test_bad_output_depths_are_refused(model):
    from transformers import DynamicCache

    ids = torch.randint(3, 288, (1, 4))
    for bad in ((), (0, 2), (2, 2), (1.5,), [True]):
        with pytest.raises(ValueError, match="output_depths"):
            model(ids, output_depths=bad, use_cache=False)
    with pytest.raises(ValueError, match="num_loops=8.*output_depths"):
        model(ids, output_depths=(1, 4), num_loops=8, use_cache=False)
    with pytest.raises(ValueError, match="output_depths"):
        cache = DynamicCache()
        model(ids, num_loops=4, cache=cache)
        model(ids, output_depths=(1, 4), cache=cache)
    model.train()
    try:
        with pytest.raises(ValueError, match="evaluation"):
            model(ids, output_depths=(1, 4))
    finally:
        model.eval()


def test_eval_sweep_scores_every_depth_in_one_pass(bundle):
    """``parcae eval`` with several depths: per-item scores equal single-depth runs, with one forward per batch for
    all depths (forward calls counted) instead of one per depth."""
    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.runner import build_tasks, run_lm_eval

    from conftest import tiny_eval_model

    model, tokenizer = tiny_eval_model(seed=1, context=128)
    tasks = build_tasks(["copa", "arc_easy", "lambada_openai", "winograd"], bundle, 4)
    calls = []
    model.model.register_forward_pre_hook(lambda module, args: calls.append(1))

    single = {}
    for depth in (1, 3):
        lm = ParcaeLM(model, tokenizer=tokenizer, num_loops=depth, batch_size=8)
        single[depth] = run_lm_eval(lm, tasks, seed=1234, log_samples=True)
    single_calls = len(calls)
    calls.clear()
    lm = ParcaeLM(model, tokenizer=tokenizer, batch_size=8)
    lm.sweep_depths = [1, 3]
    for depth in (1, 3):
        lm.num_loops = depth
        swept = run_lm_eval(lm, tasks, seed=1234, log_samples=True)
        for label, result in swept.items():
            assert result["acc"] == single[depth][label]["acc"], (depth, label)
            for mine, ref in zip(result["samples"], single[depth][label]["samples"]):
                assert mine["mean_loss"] == pytest.approx(ref["mean_loss"], abs=1e-5)
    assert 0 < len(calls) <= single_calls // 2


def test_bits_per_byte_sweep_equals_each_depth(model, shakespeare_text):
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer
    from modeling_parcae.eval.bpb import bits_per_byte, bits_per_byte_at_depths

    from conftest import FIXTURES

    tokenizer = load_official_tokenizer(FIXTURES / "golden" / "tokenizer", 64)
    documents = [d for d in shakespeare_text.split("\n\n") if d.strip()][:12]
    swept = bits_per_byte_at_depths(model, tokenizer, documents, [1, 4], batch_size=5, progress=False)
    for depth in (1, 4):
        alone = bits_per_byte(model, tokenizer, documents, num_loops=depth, batch_size=5, progress=False)
        assert swept[depth]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        assert swept[depth]["bpb"] == pytest.approx(alone["bpb"], rel=1e-6)
    assert swept[1]["loss"] != pytest.approx(swept[4]["loss"], rel=1e-4)
