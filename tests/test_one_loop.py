"""The one loop over transformers' own caches: every cache type, every read-out, the same outputs on every path."""

import warnings

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache, StaticCache

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 61, 9]])


def exit_model_and_threshold(**kwargs):
    """A model whose tokens exit at different depths, and a threshold that splits them: the median relative state
    change after loop 3 of a fixed-depth run."""
    model = tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, **kwargs)
    with torch.no_grad():
        states = model(IDS, num_loops=6, output_hidden_states=True, use_cache=False).hidden_states
    third, second = states[1 + model.config.num_prelude_layers + 2], states[1 + model.config.num_prelude_layers + 1]
    change = (third - second).norm(dim=-1) / third.norm(dim=-1)
    return model, float(change.median())


def greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=6, do_sample=False, num_loops=3, **kwargs)


def test_a_user_dynamic_cache_is_grown_to_one_layer_per_executed_block_and_equals_the_default():
    model = tiny_model()  # prelude 1, core 2, coda 1
    cache = DynamicCache(config=model.config)  # one layer per physical block, as transformers builds it
    out = model.generate(IDS, max_new_tokens=6, do_sample=False, num_loops=3, cache=cache, return_dict_in_generate=True)
    assert out.cache is cache and len(cache.layers) == 1 + 3 * 2 + 1
    assert torch.equal(out.sequences, greedy(model, IDS))


def test_the_quantized_cache_reads_its_fp8_keys_values_within_tolerance():
    """transformers' built-in fp8 backend rounds the cached keys/values. Teacher-forced along the default cache's
    greedy tokens, each decode step's logits stay within 0.1 of the default's (e4m3 keeps 3 mantissa bits: up to ~6% per
    cached value), and its argmax agrees wherever the top-2 gap exceeds that; ``generate`` builds such a cache for cache_implementation="quantized"."""
    from transformers import QuantizedCache

    model = tiny_model()
    default = model.generate(IDS, max_new_tokens=6, do_sample=False, num_loops=3, output_logits=True,
                             return_dict_in_generate=True)
    cache = QuantizedCache(backend="fp8", config=model.config)
    with torch.no_grad():
        model(IDS, cache=cache, num_loops=3)
        for step, expected in enumerate(default.logits[1:]):
            token = default.sequences[:, IDS.shape[1] + step: IDS.shape[1] + step + 1]
            logits = model(token, cache=cache, num_loops=3).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=0.1, rtol=0)
            top2 = expected.topk(2).values[0]
            if top2[0] - top2[1] > 0.2:
                assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert len(cache.layers) == 1 + 3 * 2 + 1
    generated = model.generate(IDS, max_new_tokens=6, do_sample=False, num_loops=3, return_dict_in_generate=True,
                               cache_implementation="quantized", cache_config={"backend": "fp8"})
    assert isinstance(generated.cache, QuantizedCache) and generated.sequences.shape == default.sequences.shape


def test_an_offloaded_cache_decodes_the_default_tokens_on_cuda_and_is_refused_clearly_without():
    """transformers' offloading moves layers with CUDA streams: on a CUDA machine it must give the default cache's
    tokens (fp32, same kernels; measured on an H200: results/gpu_cache_checks.json), elsewhere a clear refusal."""
    model = tiny_model()
    if torch.cuda.is_available():
        model, ids = model.cuda(), IDS.cuda()
        for implementation in ("offloaded", "offloaded_static"):
            assert torch.equal(greedy(model, ids, cache_implementation=implementation, disable_compile=True),
                               greedy(model, ids))
        return
    for implementation in ("offloaded", "offloaded_static"):
        with pytest.raises(ValueError, match="no CUDA device"):
            greedy(model, IDS, cache_implementation=implementation)


@pytest.mark.numerics
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_static_cache_prefill_and_decode_equal_the_dynamic_cache(batch, padded, attn):
    """generate's prefill keeps one position (logits_to_keep=1); its lone query must not see unwritten slots."""
    model = tiny_model(attn_implementation=attn)
    ids = torch.randint(3, 250, (batch, 9), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    logits = {}
    for name, cache in (("dynamic", DynamicCache()), ("static", StaticCache(config=model.config, max_cache_len=32))):
        with torch.no_grad():
            prefill = model(ids, attention_mask=mask, cache=cache, num_loops=3, logits_to_keep=1).logits
            step_mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=-1)
            positions = step_mask.sum(-1, keepdim=True) - 1
            decode = model(prefill.argmax(-1), attention_mask=step_mask, position_ids=positions, cache=cache,
                           num_loops=3).logits
        logits[name] = (prefill, decode)
    for dynamic, static in zip(logits["dynamic"], logits["static"]):
        torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)


def test_generate_reads_out_at_the_deepest_of_output_depths():
    model = tiny_model()
    assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False, output_depths=(1, 2, 4)),
                       model.generate(IDS, max_new_tokens=6, do_sample=False, num_loops=4))


def test_hidden_states_under_adaptive_exit_are_one_per_loop_and_exited_tokens_repeat_their_state():
    model, threshold = exit_model_and_threshold()
    with torch.no_grad():
        fixed = model(IDS, num_loops=6, output_hidden_states=True, use_cache=False)
        adaptive = model(IDS, num_loops=6, exit_threshold=threshold, output_hidden_states=True, use_cache=False)
    assert len(adaptive.hidden_states) == len(fixed.hidden_states) == 1 + 1 + 6 + 1
    loops = adaptive.num_loops[0]
    assert loops.min() < 6  # some token exited
    states = adaptive.hidden_states[2:8]
    for token, ran in enumerate(loops.tolist()):
        for loop in range(ran, 6):  # after its exit, a token's state stays its last computed one
            assert torch.equal(states[loop][0, token], states[ran - 1][0, token])
    # the loops every token ran equal the fixed-depth states
    first_exit = int(loops.min())
    for loop in range(first_exit):
        torch.testing.assert_close(states[loop], fixed.hidden_states[2 + loop], atol=1e-5, rtol=1e-5)


def test_attention_maps_under_adaptive_exit_have_the_full_shape_with_idle_rows_zero():
    """One map per executed block, as at fixed depth: loops after every token has exited execute no block."""
    model, threshold = exit_model_and_threshold(attn_implementation="eager")
    with torch.no_grad():
        out = model(IDS, num_loops=6, exit_threshold=threshold, output_attentions=True, use_cache=False)
    config = model.config
    loops = out.num_loops[0]
    assert loops.min() < loops.max()  # tokens exit at different depths: some loops run packed
    executed = int(loops.max())
    assert len(out.attentions) == config.num_prelude_layers + executed * config.num_core_layers + config.num_coda_layers
    seq = IDS.shape[1]
    assert all(tuple(m.shape) == (1, m.shape[1], seq, seq) for m in out.attentions)
    for loop in range(executed):
        for j in range(config.num_core_layers):
            attention = out.attentions[config.num_prelude_layers + loop * config.num_core_layers + j][0]
            idle = loops <= loop  # tokens that had exited before this loop
            assert torch.equal(attention[:, idle], torch.zeros_like(attention[:, idle]))
            rows = attention[:, ~idle].sum(-1)
            torch.testing.assert_close(rows, torch.ones_like(rows))


def test_a_rope_scaling_extends_the_context_without_the_warning():
    from transformers.testing_utils import CaptureLogger

    from modeling_parcae.modeling_parcae import logger

    model = tiny_model(max_position_embeddings=16, rope_parameters={"rope_type": "linear", "factor": 2.0})
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured, torch.no_grad():
        logits = model(torch.randint(3, 250, (1, 30)), use_cache=False).logits
    assert "max_position_embeddings" not in captured.out and torch.isfinite(logits).all()


def test_generation_past_the_trained_context_keeps_going_and_keeps_its_tokens():
    model = tiny_model(max_position_embeddings=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(IDS, max_new_tokens=12, do_sample=False, num_loops=2)
    assert out.shape == (1, IDS.shape[1] + 12)  # 21 positions on a 16-position model, none lost


def test_generate_under_adaptive_exit_returns_one_hidden_state_per_loop_at_every_step():
    """The issue's report: generate(exit_threshold=..., output_hidden_states=True) gave 3 states per step."""
    model, threshold = exit_model_and_threshold()
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, num_loops=6, exit_threshold=threshold,
                         output_hidden_states=True, return_dict_in_generate=True)
    config = model.config
    expected = 1 + config.num_prelude_layers + 6 + config.num_coda_layers
    assert len(out.hidden_states) == 3 and all(len(step) == expected for step in out.hidden_states)
