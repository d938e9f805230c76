"""`parcae train` / `parcae train-tokenizer`: recipes, optimiser routing, schedules, data, checkpoints, and real runs.

The end-to-end runs are subprocesses of the real CLI on the tiny CPU recipe (a ~50 KB tinyshakespeare excerpt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EXCERPT, FIXTURES, REPO_ROOT
from modeling_parcae.training.checkpoint import latest_checkpoint, save_checkpoint
from modeling_parcae.training.data import build_training_data, packing_function
from modeling_parcae.training.optim import (
    build_optimizers, build_schedulers, set_muon_step_hyperparameters, split_parameters,
)
from modeling_parcae.training.recipe import DataRecipe, TrainingRecipe, bundled_recipe_path, load_recipe

ROOT = REPO_ROOT
TINY_TOKENIZER = ROOT / "configuration" / "recipes" / "tokenizer-tiny"
GOLDEN_TOKENIZER = FIXTURES / "golden" / "tokenizer" / "tokenizer.json"
BUNDLED = ["tiny-cpu", "parcae-140m", "parcae-370m", "parcae-770m", "parcae-1.3b",
           "gpt-140m", "gpt-370m", "gpt-770m", "gpt-1.3b"]
# The reference run shared by several tests: 16 steps of 16 rows in micro-batches of 4 (one process: 4 accumulated
# micro-batches; two processes: 2 each, with DDP's no_sync), checkpoints every 4, validation every 8, and a NaN
# gradient patched into step 5 by tests/nan_injection.py (the product has no such hook).
RUN_OVERRIDES = ["training.max_steps=16", "training.global_batch_size=16", "checkpoint.every_steps=4",
                 "eval.every_steps=8"]
NAN_STEP = 5
TRAIN_WITH_NAN = [str(Path(__file__).parent / "nan_injection.py"), str(NAN_STEP), "train"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def parcae(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling_parcae.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def train_with_nan(*args: str) -> subprocess.CompletedProcess:
    """``parcae train ARGS`` with a NaN gradient at step ``NAN_STEP``."""
    return subprocess.run([sys.executable, *TRAIN_WITH_NAN, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def metrics(output_dir: Path) -> dict[int, dict]:
    """Last record per step (a resumed run re-logs the steps after its checkpoint)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records}


# ----------------------------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipes_load_and_build_their_config(name):
    from modeling_parcae import ParcaeConfig, load_preset

    recipe = load_recipe(name)
    config = load_preset(recipe.model.preset, **recipe.model.config) if recipe.model.preset else \
        ParcaeConfig(**recipe.model.config)
    # CUDA's flash-attention kernel takes head sizes that are multiples of 8, up to 256
    assert config.head_dim % 8 == 0 and config.head_dim <= 256
    if name == "tiny-cpu":
        return
    # official launch configs (``launch_configs/*.yaml``)
    assert recipe.data.block_size == 2048 and recipe.training.global_batch_size == 256 and recipe.seed == 42
    assert recipe.training.betas == (0.8, 0.95) and recipe.training.eps == 1e-10
    assert recipe.training.muon_lr == 8e-3 and recipe.training.muon_weight_decay == 0.2
    assert recipe.training.cooldown_fraction == 0.5 and recipe.training.grad_clip == 1.0
    assert recipe.training.mixed_precision == "bf16" and config.vocab_size == 32768
    size = name.split("-")[1]
    assert recipe.training.adamw_lr == {"140m": 8e-3, "370m": 8e-3, "770m": 6e-3, "1.3b": 6e-3}[size]
    assert recipe.training.max_tokens == {"140m": 11.2e9, "370m": 29.6e9, "770m": 61.6e9, "1.3b": 104e9}[size]
    assert config.looped == name.startswith("parcae")
    if config.looped:
        assert (config.mean_recurrence, config.mean_backprop_depth) == (8, 4)
        assert config.sampling_scheme == "poisson-truncated-full"


def test_unknown_recipe_keys_are_listed(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(bundled_recipe_path("tiny-cpu").read_text() + "learning_rate: 0.1\n")
    with pytest.raises(ValueError) as error:
        load_recipe(recipe, ["training.warmup=3", "data.block_size=32"])
    assert "learning_rate" in str(error.value) and "training.warmup" in str(error.value)
    with pytest.raises(ValueError, match=r"unknown key\(s\): model.config.hiden_size"):
        load_recipe("tiny-cpu", ["model.config.hiden_size=32"])


def test_cli_rejects_unknown_key_before_training(tmp_path):
    result = parcae("train", "tiny-cpu", f"output_dir={tmp_path / 'run'}", "training.lr=0.1", "eval.depth=[1]")
    assert result.returncode == 2, result.stderr
    assert "unknown key(s): eval.depth, training.lr" in result.stderr
    assert not (tmp_path / "run").exists()


def test_overrides_are_typed():
    recipe = load_recipe("tiny-cpu", ["training.max_steps=7", "eval.depths=[1, 3]", "training.eps=1e-8",
                                      "model.config.hidden_size=32"])
    assert recipe.training.max_steps == 7 and recipe.eval.depths == [1, 3]
    assert recipe.training.eps == 1e-8 and isinstance(recipe.training.eps, float)
    assert recipe.model.config["hidden_size"] == 32


# ----------------------------------------------------------------------------------------------------------------
# optimiser and schedules
# ----------------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.ones(8))
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = nn.Parameter(torch.ones(8))
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(8, 8, bias=False))
        self.self_attn.ve_gate = nn.Linear(4, 2, bias=False)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(8, 32, bias=False)
        self.mlp.down_proj = nn.Linear(32, 8, bias=False)


class _StubParcae(nn.Module):
    """Same parameter names as ParcaeForCausalLM (official routing, ``recpre/optim/__init__.py``)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, 8)
        self.model.value_embeddings = nn.ModuleDict({"1": nn.Embedding(16, 8)})
        self.model.prelude = nn.ModuleList([_Block()])
        self.model.core = nn.ModuleList([_Block()])
        self.model.injection = nn.Module()
        self.model.injection.A_log = nn.Parameter(torch.zeros(8))
        self.model.injection.dt_bias = nn.Parameter(torch.zeros(8))
        self.model.injection.B = nn.Parameter(torch.eye(8))
        self.model.state_readout = nn.Linear(8, 8, bias=False)
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.ones(8))
        self.model.prelude_norm = nn.Module()
        self.model.prelude_norm.weight = nn.Parameter(torch.ones(8))
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied


def test_optimizer_routing_follows_the_official_split():
    model = _StubParcae()
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw = split_parameters(model)
    muon_names = {names[id(p)] for p in muon}
    adamw_names = {names[id(p)] for p in adamw}
    expected_muon = {f"model.{stage}.0.{part}.weight" for stage in ("prelude", "core")
                     for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "self_attn.ve_gate", "mlp.up_proj", "mlp.down_proj")}
    assert muon_names == expected_muon
    assert adamw_names == set(names.values()) - expected_muon
    assert {"model.embed_tokens.weight", "model.value_embeddings.1.weight", "model.injection.B",
            "model.state_readout.weight", "model.norm.weight"} <= adamw_names
    optimizers = build_optimizers(model, TrainingRecipe(max_steps=10))
    assert isinstance(optimizers[0], torch.optim.Muon) and isinstance(optimizers[1], torch.optim.AdamW)
    adamw_group = optimizers[1].param_groups[0]
    assert adamw_group["betas"] == (0.8, 0.95) and adamw_group["eps"] == 1e-10
    assert optimizers[0].param_groups[0]["lr"] == 8e-3


def test_trapezoid_schedule_and_muon_hyperparameters():
    model = _StubParcae()
    recipe = TrainingRecipe(max_steps=100)
    optimizers = build_optimizers(model, recipe)
    schedulers = build_schedulers(optimizers, recipe, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append([group["lr"] for optimizer in optimizers for group in optimizer.param_groups])
        for scheduler in schedulers:
            scheduler.step()
    muon_lr = [lr[0] for lr in lrs]
    assert all(lr == pytest.approx(8e-3) for lr in muon_lr[:51])  # constant for the first half
    for step in range(50, 100):  # then linear decay to 0: lr * (100 - step) / 50
        assert muon_lr[step] == pytest.approx(8e-3 * (100 - step) / 50)
    set_muon_step_hyperparameters(optimizers[0], recipe, step=150, total_steps=600)
    group = optimizers[0].param_groups[0]
    assert group["momentum"] == pytest.approx(0.85 + 0.1 * 150 / 300)
    assert group["weight_decay"] == pytest.approx(0.2 * (1 - 150 / 600))
    set_muon_step_hyperparameters(optimizers[0], recipe, step=400, total_steps=600)
    assert group["momentum"] == pytest.approx(0.95)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------
def test_trained_tokenizer_matches_the_official_format(tmp_path):
    result = parcae("train-tokenizer", "--data", str(EXCERPT), "--vocab-size", "300", "--output", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    ours = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    golden = json.loads(GOLDEN_TOKENIZER.read_text())
    for key in ("normalizer", "pre_tokenizer", "decoder", "added_tokens"):
        assert ours[key] == golden[key], key
    assert ours["model"]["type"] == "BPE" and ours["model"]["byte_fallback"] is True
    assert len(ours["model"]["vocab"]) == 300

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|bos|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|eos|>", 1)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 2)
    text = "Hello world!  The 12345 fox.\n\nÄß ☃"
    ids = tokenizer(text)["input_ids"]
    assert 0 not in ids and 1 not in ids  # no automatic BOS/EOS, like the official tokenizer
    assert tokenizer.decode(ids) == text
    # the official pre-tokenizer groups digits by at most two
    pieces = [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == ["12", "34", "5"]


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


class _AttentionKernelCalls(TorchDispatchMode):
    """The attention kernels a step dispatches to, each with its arguments by name (tensors as their dtypes, as
    autocast hands them over; defaults filled in from the kernel's schema)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in func.name():
            named = {argument.name: argument.default_value for argument in func._schema.arguments}
            named.update(zip(named, args), **kwargs)
            self.calls.append((func.name(), {name: value.dtype if isinstance(value, torch.Tensor) else value
                                             for name, value in named.items()}))
        return func(*args, **kwargs)


@pytest.mark.parametrize("batch", [1, 4])
def test_training_step_attention_is_the_flash_kernel_form_under_bf16_autocast(tiny_tokenizer, batch):
    """`parcae train`'s step under bf16 autocast (its GPU default) hands attention bf16 queries, keys and values,
    causal, with no mask: the form CUDA's flash kernel takes (a mask or a float32 operand would send it to the
    memory-efficient or math kernel). On CPU the same dispatch picks the CPU flash kernel, so every forward and
    backward attention call must be that kernel, in that form."""
    from modeling_parcae.training.loop import build_model

    torch.manual_seed(0)
    model = build_model(load_recipe("tiny-cpu").model, tiny_tokenizer).train()
    assert model.config._attn_implementation == "sdpa"
    rows = torch.randint(0, model.config.vocab_size, (batch, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16), _AttentionKernelCalls() as kernels:
        model(input_ids=rows[:, :-1], shift_labels=rows[:, 1:]).loss.backward()  # as in the training loop
    names = [name for name, _ in kernels.calls]
    forward = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert names.count(forward) >= 3 and set(names) == {forward, forward + "_backward"}, names
    for name, arguments in kernels.calls:
        if name == forward:
            assert [arguments[operand] for operand in ("query", "key", "value")] == [torch.bfloat16] * 3, arguments
            assert arguments["is_causal"] and arguments["attn_mask"] is None and arguments["dropout_p"] == 0.0


def test_packing_separates_documents_with_eos(tiny_tokenizer):
    pack = packing_function(tiny_tokenizer, "text", block_size=7)
    documents = ["To be, or not to be", "", "that is the question"]
    rows = pack({"text": documents})["input_ids"]
    expected = []
    for text in (documents[0], documents[2]):
        expected += tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert all(len(row) == 8 for row in rows)
    assert [token for row in rows for token in row] == expected[: 8 * (len(expected) // 8)]


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_row_stream_resumes_at_the_same_rows(tiny_tokenizer, streaming):
    """Local files exercise both paths; streaming is the code path of Hub datasets (FineWeb-Edu)."""
    recipe = DataRecipe(path=str(EXCERPT), block_size=32, validation_documents=8, streaming=streaming,
                        shuffle_buffer=64)
    stream, validation = build_training_data(recipe, tiny_tokenizer, seed=3, main_process_first=_nullcontext)
    assert len(validation) == 8 and all(2 <= len(doc) <= 33 for doc in validation)
    first = stream.next_rows(5)
    state = stream.state_dict()
    rest = stream.next_rows(2000)  # crosses into the next epoch (the excerpt packs into ~800 rows)
    assert state["epoch"] == 0 and stream.epoch >= 1
    resumed, _ = build_training_data(recipe, tiny_tokenizer, seed=3, main_process_first=_nullcontext)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_rows(2000), rest)
    assert first.shape == (5, 33) and not torch.equal(first, rest[:5])
    other_seed, _ = build_training_data(recipe, tiny_tokenizer, seed=4, main_process_first=_nullcontext)
    assert not torch.equal(other_seed.next_rows(5), first)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_jsonl_and_parquet_with_extra_columns(tmp_path, tiny_tokenizer, suffix, streaming):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [part for part in EXCERPT.read_text().split("\n\n") if part.strip()][:60]
    path = tmp_path / f"docs.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps({"id": i, "text": text, "score": 0.5}) for i, text in enumerate(texts)))
    else:
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)
    recipe = DataRecipe(path=str(path), block_size=16, validation_documents=4, streaming=streaming)
    stream, validation = build_training_data(recipe, tiny_tokenizer, seed=0, main_process_first=_nullcontext)
    held_out = tiny_tokenizer(texts[:4], add_special_tokens=False)["input_ids"]
    assert validation == [ids[:17] for ids in held_out]
    rows = stream.next_rows(4)
    assert rows.shape == (4, 17)
    encoded = tiny_tokenizer(texts[4:], add_special_tokens=False)["input_ids"]
    training_tokens = {token for ids in encoded for token in ids}
    assert set(rows.flatten().tolist()) <= training_tokens | {tiny_tokenizer.eos_token_id}


def test_missing_text_column_is_a_clear_error(tmp_path, tiny_tokenizer):
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(10)))
    with pytest.raises(ValueError, match="text column 'text' not found .* available columns: body"):
        build_training_data(DataRecipe(path=str(data)), tiny_tokenizer, seed=0, main_process_first=_nullcontext)
    result = parcae("train", "tiny-cpu", f"data.path={data}", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "text column 'text' not found" in result.stderr and "body" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
def test_crash_during_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch, accelerator):
    model = accelerator.prepare(nn.Linear(4, 4))
    directory = tmp_path / "checkpoints"
    first = save_checkpoint(accelerator, directory, step=10, keep_last=2)
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    def crash(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, directory, step=20, keep_last=2)
    monkeypatch.undo()
    assert latest_checkpoint(directory) == first
    accelerator.load_state(str(first))
    assert torch.equal(model.weight, saved_weight)
    # the next save clears the leftover temporary folder and prunes to keep_last
    for step in (30, 40, 50):
        save_checkpoint(accelerator, directory, step=step, keep_last=2)
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000040", "step-00000050"]


# ----------------------------------------------------------------------------------------------------------------
# end-to-end runs of the tiny recipe
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "run"
    result = train_with_nan("tiny-cpu", f"output_dir={output}", *RUN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_tiny_recipe_trains_and_loss_falls(reference_run):
    output, _ = reference_run
    records = metrics(output)
    assert sorted(records) == list(range(1, 17))
    losses = [records[step]["train/loss"] for step in range(1, 17)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.8
    assert records[16]["val/loss@4"] < records[8]["val/loss@4"]
    for depth in (1, 2, 4, 8):  # validation loss and bits-per-byte at several loop depths
        assert 0 < records[16][f"val/bpb@{depth}"] < records[16][f"val/loss@{depth}"] * 2
    depths = [records[step]["train/depth"] for step in records]  # mean sampled depth of each step (Poisson, mean 4)
    assert len(set(depths)) > 3 and 3.0 <= sum(depths) / len(depths) <= 5.0
    assert any((output / "logs").rglob("events.out.tfevents.*"))  # TensorBoard tracker
    # tiny-cpu's 1/1/1 layout owns a value-embedding table and gate that no block pairs up; one process: no DDP
    unused = ("these parameters never receive a gradient in this layout and keep their initial values: "
              "model.core.0.self_attn.ve_gate.weight, model.value_embeddings.0.weight")
    assert unused in reference_run[1].stdout
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000012", "step-00000016"]


def test_injected_nan_step_is_skipped_and_reported(reference_run):
    output, result = reference_run
    records = metrics(output)
    assert "step 5: non-finite gradient norm (nan); optimizer step skipped" in result.stdout + result.stderr
    assert [step for step, record in records.items() if record["train/skipped"]] == [5]
    assert records[16]["train/skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(records[step]["train/loss"])) for step in range(6, 17))


def test_final_model_reloads_and_generates(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, _ = reference_run
    model = AutoModelForCausalLM.from_pretrained(output / "final")
    tokenizer = AutoTokenizer.from_pretrained(output / "final")
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, num_loops=4)
    assert generated.shape == (1, ids.shape[1] + 5)
    records = metrics(output)
    model.eval()
    document = tokenizer(EXCERPT.read_text()[:400], add_special_tokens=False)["input_ids"][:65]
    batch = torch.tensor([document])
    with torch.no_grad():
        loss = model(batch, labels=batch, num_loops=4).loss.item()
    assert loss < records[1]["train/loss"] - 0.8  # the trained weights were saved, not the initial ones


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(reference_run, tmp_path):
    reference, _ = reference_run
    output = tmp_path / "run"
    command = [sys.executable, *TRAIN_WITH_NAN, "tiny-cpu", f"output_dir={output}", *RUN_OVERRIDES]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (output / "metrics.jsonl").exists() and max(metrics(output), default=0) >= 6:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = max(metrics(output))
    assert 6 <= killed_at < 16 and not (output / "final").exists()

    resumed = train_with_nan("tiny-cpu", f"output_dir={output}", *RUN_OVERRIDES, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_at = int(re.search(r"resumed from \S+step-(\d+) at step (\d+)", resumed.stdout).group(2))
    assert 4 <= resumed_at <= killed_at and resumed_at % 4 == 0
    expected, got = metrics(reference), metrics(output)
    assert sorted(got) == sorted(expected)
    for step in expected:
        for key in ("train/loss", "train/lr", "train/depth", "train/grad_norm"):
            assert json.dumps(got[step][key]) == json.dumps(expected[step][key]), (step, key)  # exact, NaN too
    assert got[16]["val/loss@8"] == expected[16]["val/loss@8"]


def test_resume_extending_a_finished_run_recomputes_the_schedule_and_says_so(reference_run, tmp_path):
    """Issue 36: `--resume` with a larger training.max_steps took its next step at the finished schedule's 0 and then
    jumped, silently, and overwrote recipe.yaml. As with transformers' Trainer, the schedule is now recomputed for the
    new length: a 20-step trapezoid with cooldown_fraction 0.5 decays linearly from step 10, so step 17 (index 16)
    runs at 8e-3 * (20 - 16) / 10."""
    output = tmp_path / "run"
    shutil.copytree(reference_run[0], output)
    extended = [*RUN_OVERRIDES[1:], "training.max_steps=20"]
    result = parcae("train", "tiny-cpu", f"output_dir={output}", *extended, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training.max_steps (16 -> 20)" in result.stdout
    assert "recomputed for 20 steps" in result.stdout and "step 17 uses learning rate 0.0032" in result.stdout
    records = metrics(output)
    assert sorted(records) == list(range(1, 21))
    for step in range(17, 21):
        assert records[step]["train/lr"] == pytest.approx(8e-3 * (20 - (step - 1)) / 10, rel=1e-6), step
    assert "max_steps: 20" in (output / "recipe.yaml").read_text()
    assert "max_steps: 16" in (output / "recipe.until-step-00000016.yaml").read_text()
    assert "recipe.until-step-00000016.yaml" in result.stdout


def test_resume_with_a_changed_optimizer_setting_is_refused_naming_the_key(reference_run, tmp_path):
    """A resume that changes what the checkpoint's state means (here the learning rate) is refused before any work,
    naming the key, its saved and its new value, and the saved recipe is left as it was."""
    output = tmp_path / "run"
    shutil.copytree(reference_run[0], output)
    saved = (output / "recipe.yaml").read_text()
    result = parcae("train", "tiny-cpu", f"output_dir={output}", *RUN_OVERRIDES, "training.adamw_lr=1e-3",
                    "--resume")
    assert result.returncode == 2
    assert "training.adamw_lr (0.008 -> 0.001)" in result.stderr and "training.max_steps" not in result.stderr
    assert (output / "recipe.yaml").read_text() == saved and not list(output.glob("recipe.until-*"))


def test_two_process_ddp_matches_one_process(reference_run, tmp_path):
    """Same global batch (16 rows) over 2 CPU processes (gloo, 2 micro-batches each) instead of 4 micro-batches.

    Tolerance: per-step training loss within 0.05 nats and final validation loss within 0.05 nats. The curves are
    not bit-identical because each process samples depths and initial states for its own 4 sequences (the depth
    sampler is shared across ranks), while the single process samples them for 4 micro-batches in turn.
    """
    reference, _ = reference_run
    output = tmp_path / "ddp"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
         str(ROOT / "configuration" / "accelerate" / "cpu-2proc.yaml"), *TRAIN_WITH_NAN,
         "tiny-cpu", f"output_dir={output}", *RUN_OVERRIDES],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "checkpoints" / "step-00000016" / "random_states_1.pkl").exists()  # really two processes
    assert result.stdout.count("keep their initial values (DDP is told to expect that): model.core.0.") == 1
    one, two = metrics(reference), metrics(output)
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(one[step]["train/loss"] - two[step]["train/loss"]) < 0.05, step
    assert [s for s in two if two[s]["train/skipped"]] == [5]
    assert abs(one[16]["val/loss@4"] - two[16]["val/loss@4"]) < 0.05
