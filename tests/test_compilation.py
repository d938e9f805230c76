"""Regional compilation (modeling_parcae.compilation): one graph per kind of block call, whatever the depth.

Recompiles are counted with a dynamo backend that records every graph it is handed and every call of one; the
numerics of real compiled code are checked with inductor on a toy model (tolerances stated per test).
"""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
from modeling_parcae.compilation import blocks_are_compiled, compile_blocks, compile_loss, parcae_blocks


class RecordingBackend:
    """A dynamo backend that runs each graph as traced and counts graphs, calls and the grad modes compiled for."""

    def __init__(self):
        self.graphs = 0
        self.calls = 0
        self.grad_modes: set[bool] = set()

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        self.grad_modes.add(torch.is_grad_enabled())

        def run(*args):
            self.calls += 1
            return graph_module.forward(*args)

        return run


def tiny_model(**overrides) -> ParcaeForCausalLM:
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_prelude_layers=2,
                  num_core_layers=2, num_coda_layers=1, max_position_embeddings=64, mean_recurrence=4,
                  mean_backprop_depth=2, recurrent_iteration_method="per-sequence",
                  sampling_scheme="poisson-truncated-full")
    fields.update(overrides)
    torch.manual_seed(0)
    return ParcaeForCausalLM(ParcaeConfig(**fields))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_sampled_depths_reuse_one_graph_per_kind_of_block_call():
    """Per-sequence Poisson depths differ step to step; the graphs compiled in the first step serve all later steps,
    and every block execution (no-grad and gradient loops alike) is a call of a compiled graph."""
    model = tiny_model().train()
    backend = RecordingBackend()
    compile_blocks(model, backend=backend, dynamic=False)
    config = model.config
    input_ids = torch.randint(3, config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    depths, graphs_after_each_step = [], []
    for _ in range(6):
        calls_before = backend.calls
        outputs = model(input_ids, labels=input_ids)
        outputs.loss.backward()
        executed = config.num_prelude_layers + config.num_coda_layers + config.num_core_layers * int(
            outputs.num_loops.max())
        assert backend.calls - calls_before == executed  # every block ran compiled
        depths.append(tuple(outputs.num_loops.tolist()))
        graphs_after_each_step.append(backend.graphs)
    assert len({max(d) for d in depths}) >= 3, depths  # the steps really ran different depths
    assert max(depths[0]) > config.mean_backprop_depth  # the first step already had no-grad loops
    assert backend.grad_modes == {True, False}
    assert graphs_after_each_step == [graphs_after_each_step[0]] * 6, graphs_after_each_step
    assert graphs_after_each_step[0] <= 4  # (value embedding or not) x (grad or not), whatever the depth


def test_compiled_training_step_equals_eager_and_a_new_depth_does_not_recompile():
    """``parcae train --compile``'s set-up (blocks and loss compiled) with inductor on CPU, fp32: loss within 1e-5 and
    every gradient within 1e-5 + 1e-4 relative of the eager step (inductor fuses and reorders float32 sums; measured
    here: the same loss, gradients within 4e-8)."""
    eager = tiny_model().train()
    compiled = copy.deepcopy(eager)
    compile_loss(compile_blocks(compiled, dynamic=False), dynamic=False)
    input_ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    state = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))  # the same initial state for both
    for model in (eager, compiled):
        model(input_ids, labels=input_ids, num_loops=(1, 2), initial_state=state).loss.backward()
    loss_eager = eager(input_ids, labels=input_ids, num_loops=(1, 2), initial_state=state).loss
    loss_compiled = compiled(input_ids, labels=input_ids, num_loops=(1, 2), initial_state=state).loss
    torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=0)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(input_ids, labels=input_ids, num_loops=(3, 2), initial_state=state).loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("batch_size, padded, attention, autocast", [
    (1, False, "sdpa", None), (4, False, "sdpa", None), (3, True, "sdpa", None), (2, True, "eager", torch.bfloat16)])
def test_a_whole_model_compile_in_training_compiles_the_loop_by_regions(batch_size, padded, attention, autocast):
    """``torch.compile(model)`` in training (what ``TrainingArguments(torch_compile=True)`` does): the loop runs in
    Python and the stages and injections it calls compile once, so new sampled depths add no graph once the first
    steps have met each grad mode and mask variant, every loop runs a compiled graph, and losses and gradients equal
    eager ones (the recording backend runs the traced graphs; the random initial state is drawn eagerly, from the
    same stream). Also under bf16 autocast with eager attention: the same ops, so the same tolerances."""
    eager = tiny_model(attn_implementation=attention).train()
    assert eager.config._attn_implementation == attention
    backend = RecordingBackend()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend)
    input_ids = torch.randint(3, 128, (batch_size, 16), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[0, :5] = attention_mask[1, :2] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    depths, graphs_after_each_step = [], []
    for step in range(7):
        calls_before = backend.calls
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            torch.manual_seed(step)
            outputs = compiled(input_ids, attention_mask=attention_mask, labels=labels)
            torch.manual_seed(step)
            reference = eager(input_ids, attention_mask=attention_mask, labels=labels)
        outputs.loss.backward()
        reference.loss.backward()
        assert torch.equal(outputs.num_loops, reference.num_loops)
        torch.testing.assert_close(outputs.loss, reference.loss, atol=1e-6, rtol=0)
        assert backend.calls - calls_before >= int(outputs.num_loops.max())  # each loop ran a compiled graph
        depths.append(max(outputs.num_loops.tolist()))
        graphs_after_each_step.append(backend.graphs)
    assert set(depths[3:]) - set(depths[:3]), depths  # a depth first reached after the graphs stopped growing
    assert graphs_after_each_step[2:] == [graphs_after_each_step[2]] * 5, graphs_after_each_step
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_compiled_loss_is_one_graph_for_every_sampled_depth_and_equals_the_eager_loss():
    """``compile_loss`` alone, on a left-padded batch with masked labels: one graph call per step (the head's logits
    have one shape whatever the depth), no new graph after the first step across several sampled depths, and loss
    and gradients equal the eager model's (the recording backend runs the traced graph as it is)."""
    eager = tiny_model().train()
    backend = RecordingBackend()
    compiled = compile_loss(copy.deepcopy(eager), backend=backend, dynamic=False)
    input_ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :6] = attention_mask[2, :1] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    depths, graphs_after_each_step = set(), []
    for step in range(5):
        calls_before = backend.calls
        torch.manual_seed(step)
        loss = compiled(input_ids, attention_mask=attention_mask, labels=labels).loss
        torch.manual_seed(step)
        reference = eager(input_ids, attention_mask=attention_mask, labels=labels)
        assert backend.calls - calls_before == 1
        torch.testing.assert_close(loss, reference.loss, atol=1e-6, rtol=0)
        loss.backward()
        reference.loss.backward()
        depths.add(int(reference.num_loops.max()))
        graphs_after_each_step.append(backend.graphs)
    assert len(depths) >= 2, depths
    assert graphs_after_each_step == [1] * 5, graphs_after_each_step
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    compile_loss(compiled, backend=backend)  # again: the original loss function is compiled, not the compiled one
    assert compiled.loss_function._torchdynamo_orig_callable is eager.loss_function


@pytest.mark.parametrize("batch_size", [1, 3])
def test_an_inductor_compiled_loss_under_bf16_autocast_equals_the_eager_loss(batch_size):
    """Inductor's fused cross-entropy over bf16 logits (what a bf16 GPU run computes) against transformers' eager
    loss, which upcasts the logits to float32 first: both take the log-softmax in float32 of the same bf16 logits,
    so the losses agree within 1e-5 (measured: within 5e-7; a bf16 log-softmax is 3e-3 to 5e-2 off) and the head's
    gradient within bf16 rounding (1e-2 relative; measured: equal) -- at batch 1 and on a left-padded batch of 3
    with masked labels."""
    eager = tiny_model().train()
    compiled = compile_loss(copy.deepcopy(eager), dynamic=False)
    input_ids = torch.randint(3, 128, (batch_size, 16), generator=torch.Generator().manual_seed(6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :batch_size] = 0  # batch 3: three masked positions in the first row; batch 1: one
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    state = torch.randn(batch_size, 16, 32, generator=torch.Generator().manual_seed(7))
    losses = []
    for model in (eager, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(input_ids, attention_mask=attention_mask, labels=labels, num_loops=(1, 2),
                            initial_state=state)
        assert outputs.logits.dtype == torch.bfloat16
        outputs.loss.backward()
        losses.append(outputs.loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled.lm_head.weight.grad, eager.lm_head.weight.grad, atol=1e-4, rtol=1e-2)


def test_compile_loss_rejects_a_module_without_a_loss_function():
    with pytest.raises(ValueError, match="no loss_function"):
        compile_loss(torch.nn.Linear(2, 2))


def test_state_dict_keys_and_module_tree_are_unchanged():
    model = tiny_model()
    keys = list(model.state_dict())
    compile_blocks(model, backend=RecordingBackend())
    assert list(model.state_dict()) == keys
    assert blocks_are_compiled(model) and len(parcae_blocks(model)) == 5
    assert not blocks_are_compiled(tiny_model())


@pytest.mark.versions
def test_inference_with_a_cache_does_not_recompile_when_num_loops_changes():
    """Prefill (no cache), cached prefill and greedy generation with the dynamic and the static cache (both written
    inside the graphs), and a cache whose own ``update`` runs eagerly between two graphs: logits equal eager ones
    exactly (the recording backend runs the traced graphs as they are), and no new graph once each kind of call has
    been seen, whatever num_loops."""
    from transformers import DynamicCache

    class CountingCache(DynamicCache):
        """A cache that overrides ``update``: compiled blocks must call it eagerly, once per executed block."""

        writes = 0

        def update(self, *args, **kwargs):
            self.writes += 1
            return super().update(*args, **kwargs)

    model = tiny_model().eval()
    input_ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = {loops: model(input_ids, num_loops=loops, use_cache=False).logits for loops in (2, 3, 6)}
        generated = {kind: model.generate(input_ids, num_loops=3, max_new_tokens=5, do_sample=False,
                                          cache_implementation=kind) for kind in ("dynamic", "static")}
    backend = RecordingBackend()
    compile_blocks(model, backend=backend)
    with torch.no_grad():
        def run_everything(loops: int) -> None:
            torch.testing.assert_close(model(input_ids, num_loops=loops, use_cache=False).logits, reference[loops],
                                       atol=0, rtol=0)
            calls = backend.calls
            torch.testing.assert_close(model(input_ids, num_loops=loops, use_cache=True).logits, reference[loops],
                                       atol=0, rtol=0)
            # the default (growing) cache is written inside the graphs: one graph call per executed block, no break
            executed = len(parcae_blocks(model)) + (loops - 1) * model.config.num_core_layers
            assert backend.calls - calls == executed
            cache = CountingCache()
            torch.testing.assert_close(model(input_ids, num_loops=loops, use_cache=True, past_key_values=cache).logits,
                                       reference[loops], atol=0, rtol=0)
            assert cache.writes == executed
            for kind in ("dynamic", "static"):
                tokens = model.generate(input_ids, num_loops=loops, max_new_tokens=5, do_sample=False,
                                        cache_implementation=kind, disable_compile=True)
                if loops == 3:
                    assert torch.equal(tokens, generated[kind]), kind

        run_everything(3)
        graphs = backend.graphs
        for loops in (2, 6):
            run_everything(loops)
    assert backend.graphs == graphs


def test_compile_blocks_rejects_a_model_without_parcae_blocks():
    with pytest.raises(ValueError, match="no ParcaeDecoderLayer"):
        compile_blocks(torch.nn.Linear(2, 2))


def trainer_losses(model, output_dir, count_graphs=None, **compile_args) -> tuple[list[float], list[int]]:
    """Four steps of stock ``transformers.Trainer`` (batch 4 x 24 tokens, sampled depths): the logged losses and,
    with ``count_graphs``, its reading after each step."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = torch.randint(3, 128, (16, 24), generator=torch.Generator().manual_seed(4))
    dataset = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    graphs_per_step = []

    class CountGraphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs_per_step.append(count_graphs())

    args = TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             save_strategy="no", dataloader_num_workers=0, **compile_args)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      callbacks=[CountGraphs()] if count_graphs else [])
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], graphs_per_step


def test_trainer_trains_compiled_blocks_like_eager_without_recompiling(tmp_path):
    """Stock ``transformers.Trainer`` on a model passed through ``compile_blocks`` and ``compile_loss``
    (``torch_compile`` left off): per-step losses equal the eager Trainer's within 1e-6 (the recording backend runs
    the captured graphs, so this checks capture and the optimizer loop, not kernels), with sampled depths and
    Trainer's ``num_items_in_batch`` passed to the loss, and steps 2-4 compile nothing new."""
    backend = RecordingBackend()
    eager_losses, _ = trainer_losses(tiny_model(), tmp_path / "eager")
    compiled = compile_loss(compile_blocks(tiny_model(), backend=backend), backend=backend)
    compiled_losses, graphs_per_step = trainer_losses(compiled, tmp_path / "compiled", lambda: backend.graphs)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-6)
    assert backend.grad_modes == {True, False}  # the no-grad and the gradient loops run compiled
    assert graphs_per_step == [graphs_per_step[0]] * 4 and graphs_per_step[0] > 0, graphs_per_step


def test_trainer_torch_compile_trains_like_eager_without_a_graph_per_sampled_depth(tmp_path):
    """``TrainingArguments(torch_compile=True)`` compiles the whole model through Accelerate; in training the loop
    stays in Python (see the whole-model test above). With ``aot_eager`` (dynamo capture and AOT autograd, eager
    kernels): per-step losses equal the eager Trainer's within 1e-6, and steps 3-4, at new sampled depths, add no
    graph."""
    from modeling_parcae.modeling_parcae import sample_loop_schedule

    eager_losses, _ = trainer_losses(tiny_model(), tmp_path / "eager")
    compiled_losses, graphs_per_step = trainer_losses(
        tiny_model(), tmp_path / "compiled", lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"],
        torch_compile=True, torch_compile_backend="aot_eager")
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-6)
    config = tiny_model().config
    depths = [int(sample_loop_schedule(config, 4, 24, step).loops_run.max()) for step in range(4)]
    assert set(depths[2:]) - set(depths[:2]), depths  # steps 3-4 reach a depth the first two did not
    assert graphs_per_step[2:] == [graphs_per_step[1]] * 2 and graphs_per_step[1] > 0, graphs_per_step
