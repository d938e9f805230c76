"""ParcaeForCausalLM fine-tunes with stock ``transformers.Trainer`` + ``DataCollatorForLanguageModeling`` (no custom
Trainer, collator or loss), with and without gradient (activation) checkpointing, and with PEFT LoRA on the attention
projections.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments,
)

from conftest import EXCERPT, REPO_ROOT
from modeling_parcae import ParcaeConfig, ParcaeForCausalLM

TOKENIZER = REPO_ROOT / "configuration" / "recipes" / "tokenizer-tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and on a shared 2-core runner it costs up to 20x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def splits(tokenizer):
    """Speeches of the excerpt, tokenized to at most 64 tokens; the last 32 are held out."""
    texts = [part.strip() for part in EXCERPT.read_text().split("\n\n") if part.strip()]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    return dataset.select(range(len(dataset) - 32)), dataset.select(range(len(dataset) - 32, len(dataset)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer):
    """A tiny 'released' checkpoint to fine-tune: the official layout with random weights. The official init zeroes
    the output projections, which would leave LoRA on q/v without gradient, so they get small random values as a
    trained model has."""
    torch.manual_seed(0)
    config = ParcaeConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                          num_prelude_layers=2, num_core_layers=2, num_coda_layers=2, max_position_embeddings=128,
                          mean_recurrence=4, mean_backprop_depth=2)
    path = tmp_path_factory.mktemp("pretrained")
    model = ParcaeForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.normal_(0.0, 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _trainer(model, tokenizer, splits, output_dir, learning_rate=3e-3, **arguments) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=30, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=learning_rate, warmup_steps=0, logging_steps=5, report_to="none", use_cpu=True, seed=0,
        save_strategy="no", dataloader_num_workers=0, **arguments,
    )
    return Trainer(model=model, args=args, train_dataset=splits[0], eval_dataset=splits[1],
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer)


@pytest.mark.parametrize("gradient_checkpointing, train_num_loops", [
    pytest.param(False, None, id="sampled-depth", marks=pytest.mark.versions),
    pytest.param(True, 3, id="checkpointing-fixed-depth"),  # ``activation_checkpointing``: the 5.24 name
])
def test_trainer_fine_tunes_saves_and_reloads(pretrained, tokenizer, splits, tmp_path, gradient_checkpointing,
                                              train_num_loops):
    model = AutoModelForCausalLM.from_pretrained(pretrained, train_num_loops=train_num_loops)
    checkpointing = {"activation_checkpointing": True} if gradient_checkpointing else {}
    trainer = _trainer(model, tokenizer, splits, tmp_path / "out", **checkpointing)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)
    assert model.model.gradient_checkpointing == gradient_checkpointing
    # 30 steps x 1 forward: the depth sampler advanced once per training forward, or not at all with a fixed depth
    assert model.model.depth_sampling_step == (30 if train_num_loops is None else 0)

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    model.eval()
    ids = torch.tensor([splits[1][0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, num_loops=4).logits, model(ids, num_loops=4).logits, atol=1e-5)
    assert reloaded.config.train_num_loops == train_num_loops


def test_peft_lora_on_attention_projections_trains_and_merges(pretrained, tokenizer, splits, tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is an optional extra: pip install .[peft]")
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainable = {name for name, parameter in lora.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in trainable)
    frozen_before = {name: p.detach().clone() for name, p in lora.named_parameters() if not p.requires_grad}

    trainer = _trainer(lora, tokenizer, splits, tmp_path / "lora", learning_rate=1e-2)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.2, (before, after)
    assert all(torch.equal(p, frozen_before[name]) for name, p in lora.named_parameters() if not p.requires_grad)

    lora.eval()
    ids = torch.tensor([splits[1][0]["input_ids"]])
    with torch.no_grad():
        adapted = lora(input_ids=ids, num_loops=4).logits
        merged = lora.merge_and_unload()
        assert isinstance(merged, ParcaeForCausalLM)
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged(ids, num_loops=4).logits, adapted, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, num_loops=4).logits, adapted, atol=1e-4)


def test_predict_returns_the_logits_alone(pretrained, tokenizer, splits, tmp_path):
    """``Trainer.predict`` gathers every output field but those the config names in ``keys_to_ignore_at_inference``.
    As for Llama, the predictions are the logits alone: not the KV cache (``past_key_values`` on transformers 5.23,
    ``cache`` on 5.24) and not the loop counts (``num_loops``), which ``compute_metrics`` code does not expect."""
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    predictions = _trainer(model, tokenizer, splits, tmp_path / "out").predict(splits[1].select(range(4))).predictions
    assert isinstance(predictions, np.ndarray), f"expected the logits alone, got a {type(predictions).__name__}"
    assert predictions.shape[0] == 4 and predictions.shape[-1] == model.config.vocab_size


def test_a_float16_checkpoint_is_refused_before_the_first_step_not_trained_into_nan(pretrained, tokenizer, splits,
                                                                                     tmp_path):
    """float16 weights without float32 master weights diverge (the bundled demo ships float16: loss 5 -> 110, then
    NaN). The refusal names the fix; LoRA on a float16 base, whose trainable weights are float32, is not refused."""
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float16)
    trainer = _trainer(model, tokenizer, splits, tmp_path / "fp16")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"trainable parameters are float16.*dtype=torch.float32"):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # nothing was stepped
    peft = pytest.importorskip("peft", reason="PEFT is an optional extra: pip install .[peft]")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for name, parameter in lora.named_parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    lora.train()
    ids = torch.tensor([splits[0][0]["input_ids"][:16]])
    lora(input_ids=ids, labels=ids).loss  # no refusal: the float16 weights are frozen
