"""generate(num_loops=N): the loop-aware cache, golden greedy tokens, padding, beams, streaming and the CLI."""

import copy
import json
import subprocess
import sys
import tempfile
import threading

import pytest
import torch
from conftest import (
    FIXTURES, PARCAE_CASES, assert_greedy_agrees, greedy_with_logits, load_golden_model, load_reference, tiny_model,
)
from transformers import PreTrainedTokenizerFast, TextIteratorStreamer

from transformers import DynamicCache

from modeling_parcae import ParcaeForCausalLM, ParcaeSlotMap
from modeling_parcae.cache_parcae import cache_memory_bytes
from modeling_parcae.transformers_compat import cache_of


def greedy(model, input_ids, num_loops, max_new_tokens=10, **kwargs):
    kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
    return model.generate(input_ids, num_loops=num_loops, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return PreTrainedTokenizerFast(
        tokenizer_file=str(FIXTURES / "golden" / "tokenizer" / "tokenizer.json"),
        bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
    )


@pytest.fixture(scope="module")
def word_model():
    """A random tiny model over the golden tokenizer's 288 tokens (padded to 320)."""
    return tiny_model(seed=1, vocab_size=320, max_position_embeddings=128)


# ---------------------------------------------------------------------------------------------------------------
# correctness of the cache
# ---------------------------------------------------------------------------------------------------------------
def agrees_with(model, prompt, reference, atol=1e-5, **kwargs):
    """``reference`` (tokens, logits) of a greedy decode equals this one's up to a near tie (conftest)."""
    kwargs.setdefault("attention_mask", torch.ones_like(prompt))
    assert_greedy_agrees(*greedy_with_logits(model, prompt, **kwargs), *reference, atol=atol)


@pytest.mark.numerics
@pytest.mark.parametrize("loops", [1, 4, 8, 16])
def test_cached_greedy_equals_uncached_on_a_random_model(loops, word_model):
    """A cached step runs one query row (other kernels than the uncached forward over the whole text): logits of
    every step within 1e-5, tokens equal up to a near tie."""
    prompt = torch.randint(3, 288, (2, 7), generator=torch.Generator().manual_seed(loops))
    kwargs = dict(num_loops=loops, max_new_tokens=12, attention_mask=torch.ones_like(prompt))
    agrees_with(word_model, prompt, greedy_with_logits(word_model, prompt, use_cache=False, **kwargs), **kwargs)


@pytest.mark.numerics
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.versions) if case == "released_style" else case
                                  for case in PARCAE_CASES])  # the version lane: the released layout alone
def test_cached_greedy_equals_uncached_and_official_tokens_on_golden_cases(case):
    """Cached and uncached logits within 1e-5 up to 8 loops, 4e-5 at 16: the loop carries the two kernel paths'
    float32 rounding into every later iteration, and linear_oddcore's linear injection amplifies it (at 16 loops each
    path is about 1e-5 from a float64 forward, and the two 1.4e-5 apart, on an Intel Xeon with AVX-512 and AMX; under
    3e-6 at 8 loops). A cache fault moves logits by orders of magnitude more."""
    model = load_golden_model(case)
    reference = load_reference(case)
    prompt = reference["greedy_prompt"]
    for loops in (1, 4, 8, 16):
        kwargs = dict(num_loops=loops, max_new_tokens=10, attention_mask=torch.ones_like(prompt))
        tokens, logits = greedy_with_logits(model, prompt, **kwargs)
        agrees_with(model, prompt, (tokens, logits), atol=1e-5 if loops <= 8 else 4e-5, use_cache=False, **kwargs)
        if loops in (1, 4, 8):  # official tokens, logits within the golden 1e-4: equal up to a near tie of ours
            assert_greedy_agrees(tokens, logits, reference[f"greedy_zero_{loops}"][:, prompt.shape[1]:], None,
                                 atol=1e-4)


def test_num_loops_reaches_every_forward_of_a_generation(word_model):
    calls = []
    hook = word_model.model.core[0].register_forward_hook(lambda module, args, output: calls.append(args[0].shape[1]))
    try:
        greedy(word_model, torch.randint(3, 288, (1, 5)), num_loops=3, max_new_tokens=4)
    finally:
        hook.remove()
    # prefill (5 tokens) then 3 decode steps (1 token), each running the core block 3 times
    assert calls == [5] * 3 + [1] * 3 * 3


@pytest.mark.numerics
@pytest.mark.versions
def test_left_padded_batch_generates_what_each_prompt_generates_alone(word_model):
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 288, (length,), generator=generator) for length in (9, 5, 2)]
    width = max(len(p) for p in prompts)
    batch = torch.full((3, width), 2)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    tokens, logits = greedy_with_logits(word_model, batch, num_loops=4, max_new_tokens=10, attention_mask=mask,
                                        pad_token_id=2)
    for row, prompt in enumerate(prompts):
        agrees_with(word_model, prompt[None], (tokens[row: row + 1], logits[row: row + 1]), num_loops=4,
                    max_new_tokens=10, pad_token_id=2)


def test_a_cache_refuses_another_loop_count(word_model):
    prompt = torch.randint(3, 288, (1, 6))
    out = word_model.generate(prompt, num_loops=4, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and cache.parcae_slot_map.num_loops == 4
    with pytest.raises(ValueError, match="num_loops=4.*num_loops=8"):
        word_model(out.sequences[:, -1:], past_key_values=cache, num_loops=8)


@pytest.mark.numerics
def test_a_returned_cache_continues_the_conversation(word_model):
    prompt = torch.randint(3, 288, (1, 6), generator=torch.Generator().manual_seed(2))
    first = word_model.generate(prompt, num_loops=3, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                                attention_mask=torch.ones_like(prompt))
    follow_up = torch.cat([first.sequences, torch.randint(3, 288, (1, 3))], dim=1)
    kwargs = dict(num_loops=3, max_new_tokens=6, attention_mask=torch.ones_like(follow_up))
    agrees_with(word_model, follow_up, greedy_with_logits(word_model, follow_up, **kwargs),
                past_key_values=first.past_key_values, **kwargs)


def test_a_user_passed_cache_is_used(word_model):
    prompt = torch.randint(3, 288, (1, 4))
    cache = DynamicCache()
    greedy(word_model, prompt, 2, max_new_tokens=3, past_key_values=cache)
    assert cache.get_seq_length() == 4 + 2  # the last generated token is not fed back


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_takes_the_cache_under_either_name(name, word_model):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name deprecated, as for Llama)."""
    prompt = torch.randint(3, 288, (1, 4), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache()
    out = greedy(word_model, prompt, 2, max_new_tokens=3, return_dict_in_generate=True, **{name: cache})
    assert cache.get_seq_length() == 4 + 2
    assert out.cache is cache
    assert torch.equal(out.sequences, greedy(word_model, prompt, 2, max_new_tokens=3))


@pytest.mark.versions
def test_forward_takes_the_cache_under_either_name_and_refuses_both(word_model):
    prompt = torch.randint(3, 288, (2, 5), generator=torch.Generator().manual_seed(4))
    by_name = {}
    for name in ("cache", "past_key_values"):
        cache = DynamicCache()
        out = word_model(prompt, num_loops=2, use_cache=True, **{name: cache})
        assert cache_of(out) is cache and cache.get_seq_length() == 5
        by_name[name] = out.logits
    assert torch.equal(by_name["cache"], by_name["past_key_values"])
    with pytest.raises(TypeError, match="pass the KV cache once"):  # two caches: no silent choice of one
        word_model(prompt, num_loops=2, cache=DynamicCache(), past_key_values=DynamicCache())


def test_cache_reports_slots_and_bytes(word_model):
    prompt = torch.randint(3, 288, (2, 6))
    out = word_model.generate(prompt, num_loops=5, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    config = word_model.config
    slots = config.num_prelude_layers + 5 * config.num_core_layers + config.num_coda_layers
    assert len(cache.layers) == slots == ParcaeSlotMap.for_config(config, 5).num_slots
    cached_tokens = 6 + 4 - 1
    heads, head_dim = config.num_key_value_heads, config.head_dim
    assert cache_memory_bytes(cache) == slots * 2 * 2 * heads * cached_tokens * head_dim * 4


# ---------------------------------------------------------------------------------------------------------------
# decoding strategies
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_beam_search_returns_valid_sequences_and_matches_the_uncached_search(word_model):
    """Beams are ranked by summed log-probabilities, where two paths' rounding may swap near-equal beams: the
    comparison runs in float64, where the cache is exact up to ~1e-15 and swaps cannot happen, not in float32."""
    model = copy.deepcopy(word_model).double()
    prompt = torch.randint(3, 288, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_loops=3, num_beams=3, num_return_sequences=3, max_new_tokens=6, do_sample=False,
                  eos_token_id=None, attention_mask=torch.ones_like(prompt))
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (6, 11)
    assert torch.equal(cached[:, :5], prompt.repeat_interleave(3, dim=0))
    assert int(cached.max()) < word_model.config.vocab_size
    assert torch.equal(cached, uncached)


def test_sampling_options_run_and_are_reproducible(word_model):
    prompt = torch.randint(3, 288, (1, 5))
    kwargs = dict(num_loops=2, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01,
                  repetition_penalty=1.3, max_new_tokens=8, attention_mask=torch.ones_like(prompt))
    torch.manual_seed(0)
    a = word_model.generate(prompt, **kwargs)
    torch.manual_seed(0)
    b = word_model.generate(prompt, **kwargs)
    assert torch.equal(a, b) and a.shape == (1, 13)


def test_stop_strings_end_generation(word_model, tokenizer):
    prompt = tokenizer("Hello world", return_tensors="pt").input_ids
    full = greedy(word_model, prompt, 2, max_new_tokens=20, pad_token_id=2)
    generated = full[0, prompt.shape[1]:].tolist()
    # a generated token that decodes to a clean word on its own serves as the stop string
    position, stop = next((i, tokenizer.decode([t])) for i, t in enumerate(generated)
                          if i < 18 and tokenizer.decode([t]).isalpha() and len(tokenizer.decode([t])) > 1)
    stopped = greedy(word_model, prompt, 2, max_new_tokens=20, stop_strings=[stop], tokenizer=tokenizer,
                     pad_token_id=2)
    assert stopped.shape[1] <= prompt.shape[1] + position + 1 < full.shape[1]
    assert tokenizer.decode(stopped[0, prompt.shape[1]:]).endswith(stop)


def test_streaming_yields_the_same_text_as_non_streaming(word_model, tokenizer):
    prompt = tokenizer("Hello world", return_tensors="pt").input_ids
    expected = tokenizer.decode(greedy(word_model, prompt, 3, max_new_tokens=15, pad_token_id=2)[0, prompt.shape[1]:])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=greedy, args=(word_model, prompt, 3),
                              kwargs=dict(max_new_tokens=15, streamer=streamer, pad_token_id=2))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == expected


def test_num_loops_stays_out_of_generation_config(word_model, tmp_path):
    word_model.save_pretrained(tmp_path)
    generation_config = json.loads((tmp_path / "generation_config.json").read_text())
    assert "num_loops" not in generation_config
    reloaded = ParcaeForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(3, 288, (1, 4))
    assert torch.equal(greedy(reloaded, prompt, 2), greedy(word_model, prompt, 2))
    calls = []
    reloaded.model.core[0].register_forward_hook(lambda module, args, output: calls.append(1))
    greedy(reloaded, prompt, 9, max_new_tokens=2)
    assert len(calls) == 9 * 2  # the call argument, not a saved default, sets the depth


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, word_model, tokenizer):
    folder = tmp_path_factory.mktemp("cli-model")
    word_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(*args):
    # run outside the checkout: ``python -m`` puts the working directory first on sys.path
    return subprocess.run([sys.executable, "-m", "modeling_parcae.cli", "generate", *args], capture_output=True,
                          text=True, timeout=300, cwd=tempfile.gettempdir())


@pytest.mark.versions
def test_cli_streams_and_compares_loop_depths(saved_model):
    result = run_cli("--model", str(saved_model), "--num-loops", "2", "--max-new-tokens", "5", "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")
    result = run_cli("--model", str(saved_model), "--compare-loops", "1,3", "--max-new-tokens", "4", "Hello")
    assert result.returncode == 0, result.stderr
    assert "num_loops=1" in result.stdout and "num_loops=3" in result.stdout and "tok/s" in result.stdout
    assert "4 slots" in result.stdout and "8 slots" in result.stdout  # P + loops * R + C with P=C=1, R=2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model", "Hi"], "path /nonexistent/model does not exist"),
        (["--num-loops", "0", "Hi"], "num_loops must be >= 1"),
        (["--compare-loops", "1,x", "Hi"], "positive integers"),
    ],
)
def test_cli_rejects_bad_input_clearly(args, message, saved_model):
    if "--model" not in args:
        args = ["--model", str(saved_model), *args]
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr


def test_cli_rejects_a_prompt_longer_than_the_context(saved_model):
    result = run_cli("--model", str(saved_model), "--max-new-tokens", "10", "word " * 200)
    assert result.returncode == 2
    assert "maximum context of 128" in result.stderr


def test_user_stopping_criteria_end_generation(word_model):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterThreeNewTokens(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 5 + 3, dtype=torch.bool)

    prompt = torch.randint(3, 288, (1, 5))
    out = greedy(word_model, prompt, 2, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([
        StopAfterThreeNewTokens()]))
    assert out.shape == (1, 8)


def test_official_random_initial_state_on_a_left_padded_batch_keeps_rows_and_padding_apart(word_model, tmp_path):
    """Batch 2, left-padded, the official random initial state drawn for every token of prompt and decode: with the
    same random stream, a row's cached greedy decode does not depend on the other row's tokens, nor a padded row's on
    what its masked positions hold. (Batch 1 against batch 2 is not comparable here: the official like-init draws
    randn over the whole batch before its truncated normal, so row 0's noise depends on the batch size.)"""
    word_model.save_pretrained(tmp_path)
    official = ParcaeForCausalLM.from_pretrained(tmp_path, inference_state_init="config").eval()
    tokens = torch.randint(3, 288, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0

    def decode(second_row: torch.Tensor, seed: int = 0):
        torch.manual_seed(seed)
        out = greedy(official, torch.stack([tokens[0], second_row]), 3, max_new_tokens=6, attention_mask=mask,
                     pad_token_id=0, return_dict_in_generate=True, output_scores=True)
        return out.sequences, torch.stack(out.scores, dim=1)

    sequences, scores = decode(tokens[1])
    other_sequences, other_scores = decode(tokens[2])
    assert torch.equal(sequences[0], other_sequences[0])
    torch.testing.assert_close(scores[0], other_scores[0], atol=1e-6, rtol=0)
    assert not torch.equal(scores[1], other_scores[1])  # the second row did change
    repadded = tokens[1].clone()
    repadded[:3] = torch.tensor([0, 5, 9])  # other content at the masked positions
    padded_sequences, padded_scores = decode(repadded)
    assert torch.equal(padded_sequences[:, 7:], sequences[:, 7:])
    torch.testing.assert_close(padded_scores, scores, atol=1e-6, rtol=0)
    assert not torch.equal(decode(tokens[1], seed=1)[1], scores)  # the noise is in effect: another stream


def test_official_random_initial_state_while_decoding_is_opt_in_and_seedable(word_model, tmp_path):
    word_model.save_pretrained(tmp_path)
    official = ParcaeForCausalLM.from_pretrained(tmp_path, inference_state_init="config").eval()
    prompt = torch.randint(3, 288, (1, 6), generator=torch.Generator().manual_seed(4))
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            runs.append(official(prompt, num_loops=3).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(0)
    sampled = greedy(official, prompt, 3, max_new_tokens=6)  # noise drawn for each new token, as officially
    assert sampled.shape == (1, 12)
    with torch.no_grad():
        assert not torch.equal(word_model(prompt, num_loops=3).logits, runs[0])  # default policy: zero state
