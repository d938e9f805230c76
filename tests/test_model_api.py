"""The transformers model API on Parcae: resizing, attentions, tuples, TP plan, caches, RoPE scaling, inputs_embeds."""

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, ParcaeModel
from modeling_parcae.modeling_parcae import ParcaeRotaryEmbedding


IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])


def test_resize_token_embeddings_resizes_every_value_embedding_table_and_keeps_the_head_tied():
    model = tiny_model()
    old_vocab = model.config.vocab_size
    old_tables = {key: table.weight.detach().clone() for key, table in model.model.value_embeddings.items()}
    assert old_tables, "the tiny model must have value-embedding tables for this test to mean anything"

    model.resize_token_embeddings(old_vocab + 10)

    for key, table in model.model.value_embeddings.items():
        assert table.weight.shape[0] == old_vocab + 10, key
        assert torch.equal(table.weight[:old_vocab], old_tables[key]), key  # old rows kept
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        logits = model(torch.tensor([[old_vocab + 9, 3, old_vocab + 1]]), num_loops=2).logits
    assert logits.shape[-1] == old_vocab + 10 and torch.isfinite(logits).all()


@pytest.mark.versions
def test_output_attentions_lists_every_executed_block_in_execution_order():
    model = tiny_model(num_prelude_layers=1, num_core_layers=2, num_coda_layers=1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        one = model(IDS, num_loops=1, output_attentions=True).attentions
        three = model(IDS, num_loops=3, output_attentions=True).attentions
    assert len(one) == 1 + 1 * 2 + 1 and len(three) == 1 + 3 * 2 + 1
    assert all(a.shape == (1, 2, IDS.shape[1], IDS.shape[1]) for a in three)
    # prelude first and loop 0's core blocks next: identical whatever the loop count (zero initial state)
    for index in range(1 + 2):
        torch.testing.assert_close(three[index], one[index])
    # then loops 1 and 2, then the coda, which sees a different state after 3 loops than after 1
    assert not torch.allclose(three[3], three[1]) and not torch.allclose(three[-1], one[-1])
    for weights in three:  # rows are causal distributions
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert torch.all(weights.triu(1) == 0)


def test_generate_returns_the_attentions_of_every_executed_block_per_step():
    model = tiny_model(num_prelude_layers=1, num_core_layers=2, num_coda_layers=1)
    model.set_attn_implementation("eager")
    out = model.generate(IDS, num_loops=3, max_new_tokens=3, do_sample=False, output_attentions=True,
                         return_dict_in_generate=True)
    assert len(out.attentions) == 3  # one entry per generated token
    for step, attentions in enumerate(out.attentions):
        assert len(attentions) == 1 + 3 * 2 + 1
        queries = IDS.shape[1] if step == 0 else 1
        assert attentions[0].shape[-2:] == (queries, IDS.shape[1] + step)


def test_return_dict_false_gives_tuples_for_every_class():
    model = tiny_model()
    with torch.no_grad():
        lm_dict = model(IDS, num_loops=2)
        lm_tuple = model(IDS, num_loops=2, return_dict=False)
        base_dict = model.model(IDS, num_loops=2)
        base_tuple = model.model(IDS, num_loops=2, return_dict=False)
    assert isinstance(lm_tuple, tuple) and isinstance(base_tuple, tuple)
    assert torch.equal(lm_tuple[0], lm_dict.logits) and torch.equal(base_tuple[0], base_dict.last_hidden_state)


def test_tp_plan_resolves_on_the_real_parameter_names_with_transformers_matcher():
    from transformers.distributed.parallel_utils import _get_parameter_plan  # the matcher of 5.24 (test only)

    model = tiny_model()
    plan = model.tp_plan
    styles = {name: _get_parameter_plan(name, plan, is_weight=True) for name, _ in model.named_parameters()}
    mlp = {name: style for name, style in styles.items() if ".mlp." in name}
    assert mlp and all(style is not None for style in mlp.values()), mlp
    assert all(style == "colwise" for name, style in mlp.items() if "up_proj" in name)
    assert all(style == "rowwise" for name, style in mlp.items() if "down_proj" in name)
    assert {name.split(".")[1] for name in mlp} == {"prelude", "core", "coda"}
    assert styles["model.prelude.0.self_attn.q_proj.weight"] is None  # attention replicated (see the config)


def test_a_cache_that_is_not_a_transformers_cache_is_refused_with_a_clear_error():
    model = tiny_model()
    with pytest.raises(TypeError, match="must be a transformers Cache"):
        model(IDS, cache=[(torch.zeros(1), torch.zeros(1))], use_cache=True)


def test_linear_rope_scaling_divides_positions_by_the_factor():
    factor = 4
    default = ParcaeRotaryEmbedding(ParcaeConfig(hidden_size=64, num_attention_heads=2))
    scaled = ParcaeRotaryEmbedding(ParcaeConfig(
        hidden_size=64, num_attention_heads=2, rope_parameters={"rope_type": "linear", "factor": float(factor),
                                                                 "rope_theta": 50000.0}))
    positions = torch.arange(0, 64 * factor, factor)[None]
    x = torch.zeros(1)
    for got, want in zip(scaled(x, positions), default(x, positions // factor)):
        torch.testing.assert_close(got, want)


def test_rope_scaling_changes_the_model_and_unknown_types_are_refused():
    model = tiny_model()
    scaled = tiny_model(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0})
    with torch.no_grad():
        assert not torch.allclose(model(IDS, num_loops=2).logits, scaled(IDS, num_loops=2).logits)
    with pytest.raises(Exception, match="rope_type"):
        tiny_model(rope_parameters={"rope_type": "no-such-rope", "rope_theta": 50000.0})


def test_inputs_embeds_carry_no_value_embeddings():
    """inputs_embeds == the same ids with every value-embedding table zero (no token id, no value embedding)."""
    model = tiny_model()
    with torch.no_grad():
        from_embeds = model(inputs_embeds=model.model.embed_tokens(IDS), num_loops=2).logits
        with_ve = model(IDS, num_loops=2).logits
        for table in model.model.value_embeddings.values():
            table.weight.zero_()
        without_ve = model(IDS, num_loops=2).logits
    torch.testing.assert_close(from_embeds, without_ve)
    assert not torch.allclose(from_embeds, with_ve)


def test_peft_prompt_tuning_trains_and_generates():
    peft = pytest.importorskip("peft", reason="the [peft] extra is not installed")
    model = tiny_model()
    tuned = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompt = [p for p in tuned.parameters() if p.requires_grad]
    assert len(prompt) == 1 and prompt[0].numel() == 4 * model.config.hidden_size
    before = prompt[0].detach().clone()
    optimizer = torch.optim.Adam(prompt, lr=1e-2)
    tuned.train()
    losses = []
    for _ in range(5):
        loss = tuned(input_ids=IDS, labels=IDS, num_loops=2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert not torch.equal(prompt[0], before) and losses[-1] < losses[0], losses
    tuned.eval()
    generated = tuned.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4,
                               do_sample=False, num_loops=2)
    assert generated.shape[1] == IDS.shape[1] + 4


def test_auto_model_is_registered_for_the_base_model():
    from transformers import AutoModel

    assert type(AutoModel.from_config(tiny_model().config)) is ParcaeModel


@pytest.mark.versions
def test_the_package_face_leaves_the_exported_class_as_the_remote_code_has_it():
    """Importing the package registers the classes and rebinds none of their methods: ``from_pretrained`` is the
    modeling file's own (the remote code's), which calls transformers'; official checkpoints load through a function
    whose name says so."""
    import modeling_parcae
    from modeling_parcae.modeling_parcae import ParcaePreTrainedModel

    assert ParcaeForCausalLM.from_pretrained.__func__ is vars(ParcaePreTrainedModel)["from_pretrained"].__func__
    assert ParcaeForCausalLM.from_pretrained.__func__.__module__ == "modeling_parcae.modeling_parcae"
    assert modeling_parcae.from_pretrained_or_official.__module__ == "modeling_parcae.conversion.hub"


def test_every_block_gets_a_block_cache_on_every_route():
    """Plain, compiled and adaptive-exit forwards: the ``cache`` each attention call receives is a transformers
    ``Cache`` on the main route and otherwise one of the views ``BlockCache`` documents, never an unnamed stand-in."""
    from transformers import Cache

    from modeling_parcae.adaptive_parcae import LatestKeysValues
    from modeling_parcae.cache_parcae import BlockCache
    from modeling_parcae.compilation import _LayerView, _SlotView, compile_blocks
    from modeling_parcae.modeling_parcae import ParcaeAttention

    def seen_caches(model, **kwargs) -> set[type]:
        seen = set()

        def record(module, args, call_kwargs):
            cache = call_kwargs.get("cache")
            assert cache is None or isinstance(cache, BlockCache), type(cache)
            seen.add(type(cache))

        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
                 if isinstance(m, ParcaeAttention)]
        try:
            with torch.no_grad():
                model(IDS, use_cache=True, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    model = tiny_model().eval()
    assert all(issubclass(kind, Cache) for kind in seen_caches(model, num_loops=3))
    assert LatestKeysValues in seen_caches(model, num_loops=3, exit_threshold=0.5)
    compile_blocks(model, backend="eager")
    assert seen_caches(model, num_loops=3) <= {_LayerView, _SlotView}
