"""ParcaeForCausalLM: parity with the official implementation, masking, recurrence, training and bad input."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    PARCAE_CASES, assert_logits_agree, load_golden_model, load_reference, site_packages_without_this_project, tiny_config,
    tiny_model,
)

from transformers import DynamicCache

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, list_presets, load_preset
from modeling_parcae.modeling_parcae import sample_loop_schedule


GOLDEN_LOOPS = (1, 2, 3, 5, 8, 12)


# ---------------------------------------------------------------------------------------------------------------
# parity with ../shared/golden (official code, fp32)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("case", PARCAE_CASES)
@pytest.mark.versions
def test_logits_match_official_for_every_loop_count(case):
    model = load_golden_model(case)
    reference = load_reference(case)
    input_ids = reference["input_ids"]
    with torch.no_grad():
        for loops in GOLDEN_LOOPS:
            for kind, state in (("state", reference["initial_state"]), ("zero", None)):
                expected = reference[f"logits_{kind}_{loops}"]
                logits = model(input_ids, num_loops=loops, initial_state=state).logits
                assert logits.shape == expected.shape
                assert_logits_agree(logits, expected, atol=1e-4)  # argmax only where the margin exceeds 2e-4


def test_zero_state_is_the_inference_default():
    model = load_golden_model("released_style")
    reference = load_reference("released_style")
    with torch.no_grad():
        logits = model(reference["input_ids"], num_loops=5).logits
    assert (logits - reference["logits_zero_5"]).abs().max() <= 1e-4


@pytest.mark.numerics
def test_gpt_baseline_matches_official():
    model = load_golden_model("gpt_baseline")
    reference = load_reference("gpt_baseline")
    assert not model.config.looped and len(model.model.core) == 0
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    assert_logits_agree(logits, reference["logits"], atol=1e-4)


def test_no_grad_with_grad_pair_gives_the_same_logits_as_the_total():
    model = load_golden_model("released_style")
    input_ids = load_reference("released_style")["input_ids"]
    with torch.no_grad():
        total = model(input_ids, num_loops=5).logits
        pair = model(input_ids, num_loops=(3, 2)).logits
    assert torch.equal(total, pair)


def test_config_num_loops_is_the_eval_default_and_from_pretrained_overrides_it(tmp_path):
    model = load_golden_model("released_style")
    reference = load_reference("released_style")
    model.save_pretrained(tmp_path)
    reloaded = ParcaeForCausalLM.from_pretrained(tmp_path, num_loops=3).eval()
    assert reloaded.config.num_loops == 3
    with torch.no_grad():
        logits = reloaded(reference["input_ids"]).logits
    assert (logits - reference["logits_zero_3"]).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# attention_mask (deliberate deviation: the official code ignores it)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("case", PARCAE_CASES)
def test_left_padded_batch_equals_each_sequence_alone(case):
    model = load_golden_model(case)
    ids = load_reference(case)["input_ids"]
    lengths = (12, 7, 3)
    pad = model.config.pad_token_id
    batch = torch.full((3, 12), pad)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate(lengths):
        batch[row, 12 - length:] = ids[row % 2, :length]
        mask[row, 12 - length:] = 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, num_loops=4).logits
        for row, length in enumerate(lengths):
            alone = model(ids[row % 2, :length][None], num_loops=4).logits[0]
            assert (padded[row, 12 - length:] - alone).abs().max() <= 1e-5, (case, length)


def test_padding_tokens_do_not_influence_real_positions():
    model = tiny_model()
    ids = torch.randint(3, 256, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :4] = 0
    other = ids.clone()
    other[0, :4] = torch.randint(3, 256, (4,))
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits[0, 4:]
        b = model(other, attention_mask=mask).logits[0, 4:]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# determinism and initial state
# ---------------------------------------------------------------------------------------------------------------
def test_eval_mode_is_bit_deterministic():
    model = load_golden_model("released_style")  # like-init model: the official code would draw noise here
    ids = load_reference("released_style")["input_ids"]
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)


def test_official_random_state_is_opt_in_and_reproducible_with_a_generator():
    model = load_golden_model("released_style", inference_state_init="config")
    ids = load_reference("released_style")["input_ids"]
    with torch.no_grad():
        a = model(ids, state_generator=torch.Generator().manual_seed(1)).logits
        b = model(ids, state_generator=torch.Generator().manual_seed(1)).logits
        c = model(ids, state_generator=torch.Generator().manual_seed(2)).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_like_init_state_follows_the_official_truncated_normal():
    model = tiny_model(hidden_size=256, num_attention_heads=4, inference_state_init="config")
    captured = []
    model.model.injection.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()))
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 64)), num_loops=1)
    state = captured[0]
    std = math.sqrt(2 / (5 * 256))
    assert state.abs().max() <= 3 * std + 1e-7
    assert abs(state.std().item() - std * 0.986) < 0.05 * std  # a +-3 sigma truncated normal has std 0.986 sigma


def test_initial_state_of_the_wrong_shape_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="initial_state"):
        model(torch.randint(0, 256, (2, 5)), initial_state=torch.zeros(2, 4, 64))


# ---------------------------------------------------------------------------------------------------------------
# recurrence in training mode
# ---------------------------------------------------------------------------------------------------------------
def test_iterations_before_the_last_k_receive_no_gradient():
    model = tiny_model()
    model.train()
    grad_flags = []
    model.model.core[0].register_forward_hook(lambda module, args, output: grad_flags.append(output.requires_grad))
    state = torch.zeros(2, 6, 64, requires_grad=True)
    out = model(torch.randint(0, 256, (2, 6)), num_loops=(3, 2), initial_state=state)
    out.logits.sum().backward()
    assert grad_flags == [False, False, False, True, True]
    assert state.grad is None  # the state only reaches the loss through the no-grad iterations

    grad_flags.clear()
    state = torch.zeros(2, 6, 64, requires_grad=True)
    model(torch.randint(0, 256, (2, 6)), num_loops=(0, 2), initial_state=state).logits.sum().backward()
    assert grad_flags == [True, True] and state.grad is not None and state.grad.abs().sum() > 0


def test_an_int_loop_count_in_training_truncates_backprop_to_mean_backprop_depth():
    model = tiny_model(mean_backprop_depth=2)
    model.train()
    grad_flags = []
    model.model.core[0].register_forward_hook(lambda module, args, output: grad_flags.append(output.requires_grad))
    model(torch.randint(0, 256, (1, 4)), num_loops=5)
    assert grad_flags == [False, False, False, True, True]


def test_sampled_depths_follow_the_poisson_truncated_scheme():
    config = tiny_config(mean_recurrence=8, mean_backprop_depth=4, recurrent_iteration_method="per-sequence")
    totals, no_grads, grads = [], [], []
    for step in range(400):
        schedule = sample_loop_schedule(config, batch_size=8, seq_len=4, step=step)
        assert schedule.loops_run.shape == (8,)
        totals.append(schedule.loops_run)
        no_grads.append(schedule.no_grad_depth)
        grads.append(schedule.grad_depth)
    total, grad, no_grad = torch.cat(totals).float(), torch.cat(grads), torch.cat(no_grads)
    assert total.min() >= 1
    assert abs(total.mean().item() - 8) < 0.25 and abs(total.var().item() - 8) < 1.0  # Poisson(8)
    assert torch.equal(grad, torch.minimum(total.long(), torch.tensor(4)))
    assert torch.equal(no_grad + grad, total.long())
    # reproducible from (seed, step)
    again = sample_loop_schedule(config, batch_size=8, seq_len=4, step=17)
    assert torch.equal(again.loops_run, totals[17])


@pytest.mark.parametrize("method,shape", [("per-batch", (1,)), ("per-sequence", (3,)), ("per-token", (3, 5))])
def test_training_forward_samples_per_configured_method(method, shape):
    model = tiny_model(recurrent_iteration_method=method)
    model.train()
    out = model(torch.randint(0, 256, (3, 5)))
    assert tuple(out.num_loops.shape) == shape
    assert model.model.depth_sampling_step == 1
    model.eval()
    assert model(torch.randint(0, 256, (3, 5))).num_loops.tolist() == [model.config.num_loops]


def test_a_training_loop_passes_its_sampling_step_and_the_model_keeps_no_count_of_its_own():
    """``depth_sampling_step`` given: the depth of that step (as the sampler draws it), and the model's own counter,
    kept for loops that pass none (Trainer), is left alone."""
    model = tiny_model(recurrent_iteration_method="per-sequence")
    model.train()
    ids = torch.randint(0, 256, (6, 5))
    for step in (3, 40, 3):
        depths = model(ids, depth_sampling_step=step).num_loops
        assert torch.equal(depths, sample_loop_schedule(model.config, 6, 5, step).loops_run)
    assert model.model.depth_sampling_step == 0


def test_per_sequence_depths_match_running_each_sequence_at_its_own_depth():
    model = tiny_model(state_init="zero")  # training otherwise draws a random initial state
    model.train()
    ids = torch.randint(0, 256, (4, 6))
    step = model.model.depth_sampling_step
    with torch.no_grad():
        out = model(ids)
        model.eval()
        for row, depth in enumerate(out.num_loops.tolist()):
            alone = model(ids[row:row + 1], num_loops=depth).logits[0]
            assert (out.logits[row] - alone).abs().max() < 1e-5
    assert model.model.depth_sampling_step == step + 1


def test_adamw_steps_on_shakespeare_lower_the_loss(shakespeare_text):
    torch.manual_seed(0)
    model = ParcaeForCausalLM(tiny_config(num_core_layers=1, mean_recurrence=3, mean_backprop_depth=2))
    data = torch.tensor(list(shakespeare_text.encode()[:20000]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, len(data) - 65, (8,), generator=generator)
        batch = torch.stack([data[s:s + 64] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_loss_uses_unshifted_labels_and_num_items_in_batch():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    assert torch.allclose(out.loss, manual, atol=1e-6)
    count = (labels[:, 1:] != -100).sum()
    assert torch.allclose(summed, manual * count / 100, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=3)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids, num_loops=(1, 2)).loss.backward()
        grads.append(model.model.core[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gradient_checkpointing_leaves_a_passed_cache_alone():
    """The backward replays each checkpointed block, so transformers' checkpointing layer drops the cache argument (as
    for Llama) rather than let the replay write it twice. It knows the argument by the installed release's name
    (``past_key_values`` on 5.23, ``cache`` on 5.24): the blocks must receive it under that name."""
    model = tiny_model(seed=3)
    model.activation_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    model(ids, labels=ids, num_loops=(1, 2), past_key_values=cache, use_cache=True).loss.backward()
    assert cache.get_seq_length() == 0


# ---------------------------------------------------------------------------------------------------------------
# outputs, dtypes, init
# ---------------------------------------------------------------------------------------------------------------
def test_hidden_states_are_prelude_then_each_loop_then_coda():
    model = tiny_model(num_prelude_layers=2, num_coda_layers=3)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 5)), num_loops=4, output_hidden_states=True)
    assert len(out.hidden_states) == 1 + 2 + 4 + 3
    state = model.model
    with torch.no_grad():
        last_loop = out.hidden_states[1 + 2 + 3]
        coda_input = state.state_readout(last_loop)
        assert torch.allclose(out.hidden_states[-1], _run_coda(state, coda_input), atol=1e-5)


def _run_coda(base_model, hidden):
    positions = torch.arange(hidden.shape[1])[None]
    embeddings = base_model.rotary_emb(hidden, positions)
    for block in base_model.coda:
        hidden = block(hidden, attention_mask=None, position_embeddings=embeddings)
    return hidden


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close_to_fp32(dtype):
    model = load_golden_model("released_style")
    ids = load_reference("released_style")["input_ids"]
    with torch.no_grad():
        reference = model(ids, num_loops=4).logits
        half = model.to(dtype)(ids, num_loops=4).logits
    assert half.dtype == dtype and torch.isfinite(half).all()  # the model's dtype, as Llama's logits
    assert (half.float() - reference).abs().max() < 0.15


def test_from_scratch_init_follows_the_official_scheme():
    config = tiny_config(hidden_size=128, num_attention_heads=2)
    model = ParcaeForCausalLM(config)
    core = model.model.core[0]
    std = math.sqrt(2 / (5 * 128))
    assert core.self_attn.o_proj.weight.abs().max() == 0 and core.mlp.down_proj.weight.abs().max() == 0
    assert abs(core.self_attn.q_proj.weight.std().item() - std) < 0.1 * std
    q = core.self_attn.q_proj.weight
    assert torch.allclose(q @ q.T, torch.eye(128) * std**2 * 128, atol=1e-5)  # orthogonal rows
    decay = model.model.injection.decay()
    assert torch.allclose(decay, torch.full_like(decay, math.sqrt(1 / 5)), atol=1e-6)
    assert torch.equal(model.model.injection.B, torch.eye(128))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert abs(model.model.value_embeddings["1"].weight.std().item() - 1) < 0.05


def test_the_other_official_init_rules_reach_their_layers():
    """Value-embedding gates keep PyTorch's Linear default (uniform within 1/sqrt(fan_in), wider than the orthogonal
    std); the linear injection is a normal truncated at 3 std (an orthogonal matrix of that size has entries beyond);
    norms start at one; a resized value-embedding table keeps its rule for a later (re)initialisation."""
    std = math.sqrt(2 / (5 * 128))
    model = ParcaeForCausalLM(tiny_config(hidden_size=128, num_attention_heads=2, injection_type="linear"))
    gates = [block.self_attn.ve_gate.weight for block in model.model.core if block.self_attn.ve_gate is not None]
    assert gates
    for gate in gates:
        bound = 1 / math.sqrt(gate.shape[1])
        assert gate.abs().max() <= bound and gate.std() > 1.3 * std
    proj = model.model.injection.proj.weight
    assert proj.abs().max() <= 3 * std and abs(proj.std().item() - std) < 0.1 * std
    assert all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in (
        model.model.norm, model.model.prelude_norm, model.model.core[0].input_layernorm))
    model.resize_token_embeddings(model.config.vocab_size + 64)
    table = model.model.value_embeddings["1"]
    assert table.weight.shape[0] == model.config.vocab_size
    model._init_weights(table)
    assert abs(table.weight.std().item() - 1) < 0.05


@pytest.mark.parametrize("mean_resizing", [True, False])
@pytest.mark.versions
def test_resizing_gives_the_new_value_embedding_rows_their_tables_distribution(mean_resizing):
    """As transformers resizes the token embedding: by default the added rows are the old rows' mean (sampled with a
    1e-9-scaled covariance); ``mean_resizing=False`` draws them by the table's own rule, N(0, 1) — transformers draws
    them on a fresh, untagged table (the orthogonal default, std ~0.06 here), so the model redraws them. Old rows are
    kept either way."""
    model = ParcaeForCausalLM(tiny_config(hidden_size=128, num_attention_heads=2))
    before = {key: table.weight.detach().clone() for key, table in model.model.value_embeddings.items()}
    old_rows = model.config.vocab_size
    model.resize_token_embeddings(old_rows + 256, mean_resizing=mean_resizing)
    for key, table in model.model.value_embeddings.items():
        assert torch.equal(table.weight[:old_rows], before[key])
        added = table.weight[old_rows:].detach()
        if mean_resizing:
            torch.testing.assert_close(added, before[key].mean(0).expand_as(added), atol=1e-3, rtol=0)
        else:
            assert abs(added.std().item() - 1) < 0.1, key


# ---------------------------------------------------------------------------------------------------------------
# persistence and remote code
# ---------------------------------------------------------------------------------------------------------------
def test_save_and_reload_is_exact(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 9))
    model.save_pretrained(tmp_path)
    reloaded = ParcaeForCausalLM.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.versions
def test_trust_remote_code_load_without_this_package(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 7))
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(ids, num_loops=3).logits
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    assert (tmp_path / "model" / "modeling_parcae.py").exists()
    script = f"""
import sys, torch
try:
    import modeling_parcae  # noqa: F401
    sys.exit('modeling_parcae must not be importable in this test')
except ImportError:
    pass
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    logits = model(io['ids'], num_loops=3).logits
assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
assert torch.equal(logits, io['expected']), (logits - io['expected']).abs().max()
print('remote-ok')
"""
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env=_env_without_editable_finder(tmp_path))
    assert "remote-ok" in result.stdout, result.stderr[-3000:]


def _env_without_editable_finder(tmp_path):
    """An environment whose site-packages hides this project's editable install (a fresh interpreter elsewhere)."""
    import os

    shadow = site_packages_without_this_project(tmp_path / "site")
    return {**os.environ, "PYTHONPATH": str(shadow), "HF_MODULES_CACHE": str(tmp_path / "modules"),
            "PYTHONNOUSERSITE": "1"}


# ---------------------------------------------------------------------------------------------------------------
# presets, config validation, bad input
# ---------------------------------------------------------------------------------------------------------------
OFFICIAL_PARAMETER_COUNTS = {
    "parcae-140m": 144_323_136, "parcae-370m": 388_003_328, "parcae-770m": 776_655_680,
    "parcae-1.3b": 1_338_591_744, "gpt-140m": 143_141_184, "gpt-370m": 385_903_104, "gpt-770m": 773_375_040,
    "gpt-1.3b": 1_333_868_544,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMETER_COUNTS))
def test_preset_parameter_counts_equal_the_official_table(name):
    with torch.device("meta"):
        model = ParcaeForCausalLM(load_preset(name))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETER_COUNTS[name]


def test_every_preset_is_listed():
    assert set(list_presets()) == set(OFFICIAL_PARAMETER_COUNTS)
    with pytest.raises(ValueError, match="available"):
        load_preset("parcae-9b")


@pytest.mark.parametrize(
    "fields,field_name",
    [
        (dict(hidden_size=100, num_attention_heads=6), "num_attention_heads"),
        (dict(injection_type="gated"), "injection_type"),
        (dict(state_init="random"), "state_init"),
        (dict(num_loops=0), "num_loops"),
        (dict(num_attention_heads=4, num_key_value_heads=3, hidden_size=64), "num_key_value_heads"),
        (dict(recurrent_iteration_method="per-layer"), "recurrent_iteration_method"),
        (dict(sampling_scheme="uniform"), "sampling_scheme"),
    ],
)
def test_invalid_config_names_the_field(fields, field_name):
    with pytest.raises(Exception, match=field_name):
        ParcaeConfig(**fields)


@pytest.mark.parametrize("bad", [0, -2, 2.5, (0, 0), (1, 2, 3), True])
def test_bad_num_loops_is_rejected(bad):
    model = tiny_model()
    with pytest.raises(ValueError, match="num_loops"):
        model(torch.randint(0, 256, (1, 4)), num_loops=bad)


def test_a_sequence_longer_than_the_trained_context_runs_with_one_warning():
    """As transformers' decoders do (Llama runs past max_position_embeddings); the positions beyond it are real."""
    from transformers.testing_utils import CaptureLogger

    from modeling_parcae.modeling_parcae import logger

    model = tiny_model(max_position_embeddings=16)
    ids = torch.randint(0, 256, (1, 20))
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured, torch.no_grad():
        long = model(ids, use_cache=False).logits
        model(ids, use_cache=False)
    assert captured.out.count("max_position_embeddings=16") == 1
    assert torch.isfinite(long).all()
    with torch.no_grad():  # causal: the first 16 positions do not depend on what follows
        torch.testing.assert_close(long[:, :16], model(ids[:, :16], use_cache=False).logits)


def test_labels_of_the_wrong_shape_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="labels"):
        model(torch.randint(0, 256, (2, 6)), labels=torch.randint(0, 256, (2, 5)))


def test_package_imports_register_auto_classes():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("parcae", hidden_size=64, num_attention_heads=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, ParcaeForCausalLM)


@pytest.mark.versions
def test_eager_and_sdpa_attention_agree_with_padding():
    reference = load_reference("released_style")
    ids = reference["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = load_golden_model("released_style")
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids, attention_mask=mask, num_loops=3).logits
    assert (logits["eager"][0] - reference["logits_zero_3"][0]).abs().max() <= 1e-4
    assert (logits["eager"][:, 4:] - logits["sdpa"][:, 4:]).abs().max() <= 1e-5
