"""Off the tested diagonal (issue 19): paths the other tests cover on one side only -- batch 1 and > 1, padded and
not, fp32 and half, eager and sdpa attention, cached and not, compiled and eager (the list: the issue-19 note on
coverage gaps).

Two paths that run different kernels are compared as docs/generation.md ("Equal across paths") states: logits within a
tolerance, greedy tokens equal up to a near tie (conftest helpers)."""

import copy

import pytest
import torch
from conftest import (
    assert_greedy_agrees, assert_logits_agree, exit_threshold_candidates, greedy_with_logits, threshold_with_margin,
    tiny_model,
)
from transformers import CompileConfig, DynamicCache

from modeling_parcae import ParcaeSharedLoopCache

pytestmark = pytest.mark.numerics

PROMPTS = [torch.tensor([5, 17, 99, 3, 250, 42, 7]), torch.tensor([8, 1, 64, 33])]


def _pad(sequences: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded (pad id 2) to one width on ``side``, and their attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), 2)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[row, span], mask[row, span] = sequence, 1
    return ids, mask


def _batch(rows: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` prompts, left-padded to one width when ``padded`` (else the first prompt repeated)."""
    return _pad(PROMPTS[:rows] if padded else [PROMPTS[0]] * rows, "left")


def _adaptive_model(**overrides):
    """The toy model of the exit tests: 8 loops, over which its state settles."""
    return tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, mean_recurrence=8,
                      max_position_embeddings=64, **overrides)


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
    model = _adaptive_model(attn_implementation=attn)
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


# ---------------------------------------------------------------------------------------------------------------
# bounded KV memory (ParcaeSharedLoopCache) on a left-padded batch, alone and under exit_threshold
# ---------------------------------------------------------------------------------------------------------------
def _greedy_with_loops(model, input_ids, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`conftest.greedy_with_logits` plus the loops every position ran, ``(batch, prompt + steps - 1)``: the
    prefill's ``num_loops`` then each decode step's (read by a hook on the base model)."""
    loops = []
    hook = model.model.register_forward_hook(lambda module, args, output: loops.append(output.num_loops))
    try:
        tokens, logits = greedy_with_logits(model, input_ids, **kwargs)
    finally:
        hook.remove()
    return tokens, logits, torch.cat(loops, dim=1)


def test_bounded_kv_generation_of_a_left_padded_batch_equals_each_prompt_alone():
    """``generate(cache=ParcaeSharedLoopCache())`` on a left-padded batch: each row's step logits within 1e-5 of the
    prompt generated alone with its own bounded cache, greedy tokens equal up to a near tie. The batch's cache holds
    P + R + C slots (bounded), and its logits are not the exact cache's (the approximation is in effect)."""
    model = tiny_model()
    ids, mask = _batch(2, True)
    kwargs = dict(num_loops=3, max_new_tokens=6)
    cache = ParcaeSharedLoopCache()
    tokens, logits = greedy_with_logits(model, ids, attention_mask=mask, cache=cache, **kwargs)
    config = model.config
    assert len(cache.layers) == config.num_prelude_layers + config.num_core_layers + config.num_coda_layers
    exact = greedy_with_logits(model, ids, attention_mask=mask, **kwargs)[1]
    assert (logits - exact).abs().max().item() > 1e-3
    for row, prompt in enumerate(PROMPTS):
        alone = greedy_with_logits(model, prompt[None], cache=ParcaeSharedLoopCache(), **kwargs)
        assert_greedy_agrees(tokens[row: row + 1], logits[row: row + 1], *alone, atol=1e-5)


def test_bounded_kv_under_exit_threshold_on_a_left_padded_batch_equals_each_prompt_alone():
    """The bounded cache composes with ``exit_threshold`` (docs/generation.md): greedy generation of a left-padded
    batch equals each prompt alone -- loops per token equal (prompt and generated tokens), step logits within 1e-5,
    tokens equal up to a near tie -- at a threshold that every exit of the batch clears by a relative margin of 1e-3
    (conftest.threshold_with_margin); tokens exit at different depths."""
    model = _adaptive_model()
    ids, mask = _batch(2, True)
    kwargs = dict(num_loops=8, max_new_tokens=6)

    def batched(threshold):
        return _greedy_with_loops(model, ids, attention_mask=mask, exit_threshold=threshold,
                                  cache=ParcaeSharedLoopCache(), **kwargs)

    threshold = threshold_with_margin(batched, exit_threshold_candidates(model, ids, 8, mask))
    tokens, logits, loops = batched(threshold)
    real = torch.cat([mask.bool(), torch.ones(2, loops.shape[1] - ids.shape[1], dtype=torch.bool)], dim=1)
    assert len(loops[real].unique()) > 1  # tokens exit at different depths
    exact = greedy_with_logits(model, ids, attention_mask=mask, exit_threshold=threshold, **kwargs)[1]
    assert (logits - exact).abs().max().item() > 1e-3  # the bounded rule is in effect
    for row, prompt in enumerate(PROMPTS):
        alone = _greedy_with_loops(model, prompt[None], exit_threshold=threshold, cache=ParcaeSharedLoopCache(),
                                   **kwargs)
        assert torch.equal(loops[row][real[row]], alone[2][0])
        assert_greedy_agrees(tokens[row: row + 1], logits[row: row + 1], *alone[:2], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# output_depths: a padded batch continued through the cache
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["shared-prefix", "left-padded"])
def test_output_depths_continued_through_the_cache_on_a_padded_batch_equal_each_row_alone(layout):
    """A padded prefix cached with ``output_depths`` (one coda slot set per depth) and continued: every depth's logits
    of every row's real positions within 1e-5 of that row's whole text run uncached, alone, at that depth.

    ``shared-prefix`` is how ``parcae eval`` scores options (eval/row_scoring.py): two documents' prefixes
    right-padded and cached without a mask, the cache's rows copied to each option (``batch_select_indices``), the
    options right-padded and run under the prefix's mask and their own, at explicit positions. ``left-padded`` is
    generation's layout: the prompts left-padded with a mask, three more tokens under the extended mask."""
    model = tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, num_coda_layers=2,
                       max_position_embeddings=64)
    depths = (2, 1, 4)  # the deepest last: each other depth's coda slots sit after it
    generator = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, 288, (n,), generator=generator) for n in (6, 9)]
    if layout == "shared-prefix":
        owner = [0, 0, 1]  # two options of document 0, one of document 1
        suffixes = [torch.randint(3, 288, (n,), generator=generator) for n in (3, 5, 4)]
    else:
        owner = [0, 1]
        suffixes = [torch.randint(3, 288, (3,), generator=generator) for _ in owner]
    side = "right" if layout == "shared-prefix" else "left"
    prefix_ids, prefix_mask = _pad(prefixes, side)
    with torch.no_grad():
        first = model(prefix_ids, attention_mask=None if side == "right" else prefix_mask, output_depths=depths,
                      use_cache=True)
        cache = first.cache
        if layout == "shared-prefix":
            cache.batch_select_indices(torch.tensor(owner))
            own_ids, own_mask = _pad(suffixes, "right")
            lengths = torch.tensor([len(prefixes[d]) for d in owner])[:, None]
            steps = torch.minimum(torch.arange(own_ids.shape[1]), own_mask.sum(-1, keepdim=True) - 1)
            second = model(own_ids, attention_mask=torch.cat([prefix_mask[owner], own_mask], dim=-1),
                           position_ids=lengths + steps, output_depths=depths, cache=cache, use_cache=True)
        else:
            own_ids = torch.stack(suffixes)
            own_mask = torch.ones_like(own_ids)
            second = model(own_ids, attention_mask=torch.cat([prefix_mask, own_mask], dim=-1), output_depths=depths,
                           cache=cache, use_cache=True)
    for row, (document, suffix) in enumerate(zip(owner, suffixes)):
        prefix = prefixes[document]
        for depth, before, after in zip(depths, first.depth_logits, second.depth_logits):
            with torch.no_grad():
                alone = model(torch.cat([prefix, suffix])[None], num_loops=depth, use_cache=False).logits[0]
            assert_logits_agree(before[document][prefix_mask[document].bool()], alone[: len(prefix)], atol=1e-5)
            assert_logits_agree(after[row][own_mask[row].bool()], alone[len(prefix):], atol=1e-5)
    assert not torch.allclose(second.depth_logits[0], second.depth_logits[2], atol=1e-3)  # depths really differ


def test_output_depths_with_the_bounded_cache_are_refused_not_read_at_the_wrong_loop():
    """A depth sweep runs its loops once for every depth, but ``ParcaeSharedLoopCache`` serves each depth its own last
    loop's keys/values: a shallower depth continued through it read the deepest loop's (0.047 off a separate bounded
    run at depth 1). The combination is refused, naming the way out, before anything is written to the cache."""
    model = tiny_model(vocab_size=288, hidden_size=32, intermediate_size=64, num_coda_layers=2,
                       max_position_embeddings=64)
    ids = torch.randint(3, 288, (1, 10), generator=torch.Generator().manual_seed(0))
    cache = ParcaeSharedLoopCache()
    with torch.no_grad(), pytest.raises(ValueError, match="output_depths cannot use ParcaeSharedLoopCache"):
        model(ids[:, :6], output_depths=(1, 4), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 0
    with torch.no_grad():  # each depth on its own is what the message offers: at 1 loop the bounded cache is exact
        bounded, exact = ParcaeSharedLoopCache(), DynamicCache()
        model(ids[:, :6], num_loops=1, cache=bounded, use_cache=True)
        model(ids[:, :6], num_loops=1, cache=exact, use_cache=True)
        assert_logits_agree(model(ids[:, 6:], num_loops=1, cache=bounded, use_cache=True).logits,
                            model(ids[:, 6:], num_loops=1, cache=exact, use_cache=True).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# adaptive exit in half precision
# ---------------------------------------------------------------------------------------------------------------
HALF = [pytest.param(torch.bfloat16, 3e-2, id="bf16"), pytest.param(torch.float16, 1e-2, id="fp16")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_threshold_zero_is_fixed_depth_exactly_in_half_precision(dtype):
    """``exit_threshold=0`` never exits (a criterion is never below 0), so every loop takes the all-active path: the
    same kernels on the same shapes as fixed depth, bitwise equal in half precision too (forward and greedy
    generation of a left-padded batch)."""
    model = _adaptive_model().to(dtype)
    ids, mask = _batch(2, True)
    with torch.no_grad():
        fixed = model(ids, attention_mask=mask, num_loops=8, use_cache=False)
        adaptive = model(ids, attention_mask=mask, num_loops=8, exit_threshold=0.0, use_cache=False)
    assert torch.equal(adaptive.logits, fixed.logits)
    assert (adaptive.num_loops == 8).all()
    kwargs = dict(attention_mask=mask, num_loops=8, max_new_tokens=5)
    tokens, logits = greedy_with_logits(model, ids, exit_threshold=0.0, **kwargs)
    fixed_tokens, fixed_logits = greedy_with_logits(model, ids, **kwargs)
    assert torch.equal(tokens, fixed_tokens) and torch.equal(logits, fixed_logits)


def _spread_initial_state(batch: int, tokens: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Random initial states whose norms span 2^-2 to 2^6 (a fixed seed): the toy model's state decays at one rate for
    every token (its injection's ``A`` is uniform), so from the zero state all tokens' exit criteria sit within a few
    percent of each other at each loop; starting at different distances from their fixed points, tokens cross a
    threshold at different loops, with criteria spread widely enough for half-precision margins."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, tokens, size, generator=generator)
    return (noise * 2.0 ** (8 * torch.rand(batch, tokens, 1, generator=generator) - 2)).to(dtype)


def _half_precision_threshold(model, run, ids, state, mask=None) -> float:
    """A threshold that every exit decision of ``run`` clears by ``eps`` of the model's dtype (absolute).

    The criterion is a float32 norm of half-precision states; where two kernel paths round a state differently (a
    unit in the last place here and there) a criterion moves by a fraction of ``eps`` (measured: 0.22 eps in fp16,
    cached vs uncached), so a decision made a whole ``eps`` from the threshold is the same on both. Candidates: the
    geometric midpoints of the widest gaps between the criteria of a fixed-depth run (its per-loop states, real
    tokens), widest first."""
    first = 1 + model.config.num_prelude_layers
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, num_loops=8, initial_state=state, output_hidden_states=True,
                       use_cache=False).hidden_states
    states = torch.stack([state, *hidden[first: first + 8]]).float()
    change = ((states[1:] - states[:-1]).norm(dim=-1) / states[1:].norm(dim=-1))[:-1]  # no rule after the last loop
    values = (change[:, mask.bool()] if mask is not None else change).flatten().log().sort().values
    values = values[int(0.1 * len(values)): int(0.9 * len(values)) + 1]
    eps = torch.finfo(model.dtype).eps
    for i in (values[1:] - values[:-1]).argsort(descending=True)[:16]:
        candidate = float(((values[i] + values[i + 1]) / 2).exp())
        try:
            return threshold_with_margin(run, [candidate], margin=eps / candidate)
        except AssertionError:
            continue
    raise AssertionError(f"no exit_threshold decides every exit {eps:g} away from it")


@pytest.mark.parametrize("dtype,atol", HALF)
def test_adaptive_exit_in_half_precision_cached_equals_uncached(dtype, atol):
    """What holds in bf16/fp16 under ``exit_threshold``: where every exit criterion lies at least the dtype's ``eps``
    from the threshold (:func:`_half_precision_threshold`), cached decoding -- a prefill of 6 tokens, then one token
    per forward -- runs the loops per token of one uncached forward over the whole text, with logits within the
    half-precision tolerance (3e-2 bf16, 1e-2 fp16: docs/generation.md "Equal across paths"). Batch 2, tokens exiting
    at different depths (initial states at different distances, :func:`_spread_initial_state`)."""
    model = _adaptive_model().to(dtype)
    ids = torch.randint(3, 288, (2, 12), generator=torch.Generator().manual_seed(0))
    state = _spread_initial_state(2, 12, model.config.state_size, dtype)

    def uncached(threshold):
        with torch.no_grad():
            out = model(ids, num_loops=8, exit_threshold=threshold, initial_state=state, use_cache=False)
        return out.num_loops, out.logits

    threshold = _half_precision_threshold(model, uncached, ids, state)
    whole_loops, whole_logits = uncached(threshold)
    assert len(whole_loops.unique()) > 2
    with torch.no_grad():
        step = model(ids[:, :6], num_loops=8, exit_threshold=threshold, initial_state=state[:, :6], use_cache=True)
        logits, loops, cache = [step.logits], [step.num_loops], step.cache
        for t in range(6, ids.shape[1]):
            step = model(ids[:, t: t + 1], num_loops=8, exit_threshold=threshold, initial_state=state[:, t: t + 1],
                         cache=cache, use_cache=True)
            logits.append(step.logits)
            loops.append(step.num_loops)
    assert torch.equal(torch.cat(loops, dim=1), whole_loops)
    assert_logits_agree(torch.cat(logits, dim=1), whole_logits, atol=atol)


@pytest.mark.parametrize("dtype,atol", HALF)
def test_adaptive_exit_in_half_precision_on_a_left_padded_batch_equals_each_row_alone(dtype, atol):
    """In bf16/fp16, under a threshold that every exit clears by the dtype's ``eps``: a left-padded batch scores, on
    its real positions, the loops per token of each row run alone and logits within the half-precision tolerance."""
    model = _adaptive_model().to(dtype)
    lengths = (12, 7)
    texts = torch.randint(3, 288, (2, 12), generator=torch.Generator().manual_seed(0))
    states = _spread_initial_state(2, 12, model.config.state_size, dtype)
    ids, mask = _pad([texts[row, :n] for row, n in enumerate(lengths)], "left")
    state = torch.zeros_like(states)
    for row, n in enumerate(lengths):
        state[row, 12 - n:] = states[row, :n]

    def batched(threshold):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, num_loops=8, exit_threshold=threshold, initial_state=state,
                        use_cache=False)
        return out.num_loops, out.logits

    threshold = _half_precision_threshold(model, batched, ids, state, mask)
    loops, logits = batched(threshold)
    assert len(loops[mask.bool()].unique()) > 2
    for row, n in enumerate(lengths):
        with torch.no_grad():
            alone = model(texts[row: row + 1, :n], num_loops=8, exit_threshold=threshold,
                          initial_state=states[row: row + 1, :n], use_cache=False)
        real = mask[row].bool()
        assert torch.equal(loops[row][real], alone.num_loops[0])
        assert_logits_agree(logits[row][real], alone.logits[0], atol=atol)


# ---------------------------------------------------------------------------------------------------------------
# compiled static-cache decoding at batch 1 and on a left-padded batch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,padded,dtype,atol", [
    pytest.param(1, False, torch.float32, 1e-5, id="b1"),
    pytest.param(2, True, torch.float32, 1e-5, id="b2-padded"),
    pytest.param(2, True, torch.bfloat16, 3e-2, id="b2-padded-bf16"),
])
def test_compiled_static_decode_at_batch_1_and_on_a_left_padded_batch_equals_eager(rows, padded, dtype, atol):
    """``generate`` with the static cache and a compile config, at batch 1, on a left-padded batch and in bf16 (the
    inductor test in test_static_cache.py runs batch 2 unpadded, fp32): step logits within ``atol`` of eager decoding
    with the dynamic cache (1e-5 fp32, 3e-2 bf16), greedy tokens equal up to a near tie. Compiled with ``aot_eager``
    (dynamo's capture, functionalisation and guards with eager kernels: 2-4 s a case, where inductor's C++ builds take
    20-60 s here); a backend that counts its graphs and their calls shows the decode step captured once, as one
    graph, and every decode step run through it."""
    torch._dynamo.reset()  # a fresh capture whatever compiled before in this process
    graphs, calls = [], []

    def counting_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        compiled = torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

        def run(*args):
            calls.append(1)
            return compiled(*args)

        return run

    model = tiny_model().to(dtype)
    ids, mask = _batch(rows, padded)
    kwargs = dict(attention_mask=mask, num_loops=2, max_new_tokens=5)
    eager = greedy_with_logits(model, ids, **kwargs)
    compile_config = CompileConfig(fullgraph=True, backend=counting_aot_eager, mode=None)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only unless told (CPU here)
    compiled = greedy_with_logits(model, ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert len(graphs) == 1 and len(calls) == kwargs["max_new_tokens"] - 1  # the prefill runs eagerly
    assert_greedy_agrees(*compiled, *eager, atol=atol)
