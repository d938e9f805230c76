"""The pre-allocated loop-aware cache: layout, generate(cache_implementation="static"), and compiled decode."""

import pytest
import torch
from conftest import assert_greedy_agrees, greedy_with_logits, tiny_model
from transformers import CompileConfig

from transformers import StaticCache

from modeling_parcae.transformers_compat import cache_of


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7], [8, 1, 64, 33, 2, 19, 101]])


def test_static_cache_preallocates_one_fixed_slot_per_executed_block():
    model = tiny_model()  # prelude 1, core 2, coda 1
    cache = StaticCache(config=model.config, max_cache_len=20)
    with torch.no_grad():
        model(IDS, cache=cache, num_loops=3, use_cache=True)
    assert len(cache.layers) == 1 + 3 * 2 + 1
    for layer in cache.layers:
        assert layer.keys.shape == (2, 2, 20, model.config.head_dim)  # (batch, kv heads, max_cache_len, head_dim)
    assert int(cache.get_seq_length()) == IDS.shape[1]


@pytest.mark.numerics
@pytest.mark.versions
@pytest.mark.parametrize("loops", [1, 3])
def test_generate_with_the_static_cache_equals_the_dynamic_cache(loops):
    """The static cache attends over its pre-allocated length (other kernels than the dynamic cache): logits of every
    step within 1e-5, greedy tokens equal up to a near tie."""
    model = tiny_model()
    dynamic_tokens, dynamic_logits = greedy_with_logits(model, IDS, num_loops=loops, max_new_tokens=6)
    static = model.generate(IDS, num_loops=loops, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                            output_logits=True, cache_implementation="static")
    assert isinstance(cache_of(static), StaticCache)
    assert cache_of(static).parcae_slot_map.num_loops == loops
    assert_greedy_agrees(static.sequences[:, IDS.shape[1]:], torch.stack(static.logits, dim=1), dynamic_tokens,
                         dynamic_logits, atol=1e-5)




def _decode_step_inputs(model, loops):
    """Prefill eagerly into a static cache; return the inputs of the first decode step."""
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        logits = model(IDS, cache=cache, num_loops=loops, use_cache=True).logits
    positions = torch.full((IDS.shape[0], 1), IDS.shape[1])
    return dict(input_ids=logits[:, -1:].argmax(-1), position_ids=positions, cache=cache, num_loops=loops,
                use_cache=True)


def test_the_decode_step_traces_as_one_graph_without_breaks():
    model = tiny_model()
    explanation = torch._dynamo.explain(model.forward)(**_decode_step_inputs(model, loops=3))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.numerics
def test_compiled_static_decode_equals_eager_token_for_token():
    """generate compiles the decode step (fullgraph, inductor) when the cache is static. Inductor fuses and reorders
    floating-point work, so the compiled steps' logits equal eager's within 1e-5 and the greedy tokens are equal up to
    a near tie (top-2 gap within 2e-5); a cache position written or read wrongly moves logits by far more."""
    model = tiny_model()
    eager_tokens, eager_logits = greedy_with_logits(model, IDS, num_loops=2, max_new_tokens=5)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only unless told (CPU here)
    tokens, logits = greedy_with_logits(model, IDS, num_loops=2, max_new_tokens=5, cache_implementation="static",
                                        compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # generate really took the compiled path
    assert_greedy_agrees(tokens, logits, eager_tokens, eager_logits, atol=1e-5)
