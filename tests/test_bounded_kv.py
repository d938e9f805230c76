"""Bounded KV memory (``ParcaeSharedLoopCache``): runs at every loop count, holds prelude + core + coda slots whatever
``num_loops`` is, equals the exact cache where the rule makes no difference; ``parcae generate`` reports loops per
token and cache size for ``--exit-threshold`` / ``--kv-mode``."""

import pytest
import torch

from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)


def _generate(model, prompt, loops, cache):
    with torch.no_grad():
        return model.generate(prompt, num_loops=loops, past_key_values=cache, max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, return_dict_in_generate=True)


@pytest.mark.parametrize("loops", [1, 2, 3, 4, 5, 8, 16])
def test_runs_at_every_loop_count_with_memory_independent_of_loops(model, loops):
    from transformers import DynamicCache

    from modeling_parcae import ParcaeSharedLoopCache, ParcaeSlotMap
    from modeling_parcae.cache_parcae import cache_memory_bytes

    config = model.config
    prompt = torch.randint(3, 288, (2, 7))
    shared = _generate(model, prompt, loops, ParcaeSharedLoopCache())
    exact = _generate(model, prompt, loops, DynamicCache())
    assert shared.sequences.shape == exact.sequences.shape == (2, 13)
    cache = shared.past_key_values
    assert len(cache.layers) == config.num_prelude_layers + config.num_core_layers + config.num_coda_layers
    one_loop = _generate(model, prompt, 1, DynamicCache()).past_key_values
    assert cache_memory_bytes(cache) == cache_memory_bytes(one_loop)  # the size of a 1-loop cache, for any loop count
    assert cache_memory_bytes(exact.past_key_values) == cache_memory_bytes(one_loop) * (
        ParcaeSlotMap.for_config(config, loops).num_slots) // ParcaeSlotMap.for_config(config, 1).num_slots
    if loops == 1:  # a single loop is its own last loop: the rule changes nothing
        assert torch.equal(shared.sequences, exact.sequences)


def test_prefill_is_exact_and_decoding_reads_the_last_loop(model):
    """Within one forward every loop sees its own keys/values (prefill logits equal the exact cache's); a decode step
    equals the exact cache after every core slot of the exact cache is overwritten with the last loop's entries."""
    from transformers import DynamicCache

    from modeling_parcae import ParcaeSharedLoopCache, ParcaeSlotMap

    config, loops = model.config, 4
    slot_map = ParcaeSlotMap.for_config(config, loops)
    ids = torch.randint(3, 288, (1, 9))
    with torch.no_grad():
        shared = ParcaeSharedLoopCache()
        exact = DynamicCache()
        a = model(ids[:, :8], num_loops=loops, past_key_values=shared, use_cache=True).logits
        b = model(ids[:, :8], num_loops=loops, past_key_values=exact, use_cache=True).logits
        assert torch.equal(a, b)
        for loop in range(loops - 1):
            for j in range(config.num_core_layers):
                slot, last = exact.layers[slot_map.core(loop, j)], exact.layers[slot_map.core(loops - 1, j)]
                slot.keys, slot.values = last.keys, last.values
        step_shared = model(ids[:, 8:], num_loops=loops, past_key_values=shared, use_cache=True).logits
        step_exact = model(ids[:, 8:], num_loops=loops, past_key_values=exact, use_cache=True).logits
    assert (step_shared - step_exact).abs().max().item() <= 1e-5


def test_cli_reports_loops_per_token_and_cache_size(model, tmp_path, capsys):
    from modeling_parcae.cli import main
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer

    from conftest import FIXTURES

    model.save_pretrained(tmp_path / "m")
    load_official_tokenizer(FIXTURES / "golden" / "tokenizer", 64).save_pretrained(tmp_path / "m")
    config = model.config
    code = main(["generate", "hello", "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--num-loops", "8",
                 "--kv-mode", "shared", "--exit-threshold", "0.05"])
    assert code == 0
    out = capsys.readouterr().out
    slots = config.num_prelude_layers + config.num_core_layers + config.num_coda_layers
    assert "loops/token" in out and f"KV cache: {slots} slots" in out and "tok/s" in out
    code = main(["generate", "hello", "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--compare-loops",
                 "2,4", "--exit-threshold", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "2.00 loops/token" in out and "4.00 loops/token" in out
    assert main(["generate", "hello", "--model", str(tmp_path / "m"), "--exit-threshold", "-1"]) == 2
    assert "--exit-threshold" in capsys.readouterr().err
