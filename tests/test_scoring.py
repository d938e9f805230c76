"""Loss and bits-per-byte have one definition: ``parcae eval``'s bpb and training validation give the same numbers,
and both equal a plain per-document computation written out here token by token."""

import math

import pytest
import torch

from conftest import FIXTURES, tiny_model
from modeling_parcae.conversion.tokenizer import load_official_tokenizer
from modeling_parcae.eval.bpb import bits_per_byte
from modeling_parcae.scoring import pad_right, token_byte_lengths
from modeling_parcae.training.evaluation import validation_metrics

DOCUMENTS = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer",
             "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = load_official_tokenizer(FIXTURES / "golden" / "tokenizer", 256)
    return tiny_model(seed=1, vocab_size=288), tokenizer


def _by_hand(model, tokenizer, loops):
    """One document at a time, no padding: nats of every target token whose decoded text has bytes."""
    special = set(tokenizer.all_special_ids)
    nats = tokens = n_bytes = 0
    for text in DOCUMENTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids[:-1]]), num_loops=loops).logits[0].float().log_softmax(-1)
        for position, target in enumerate(ids[1:]):
            weight = 0 if target in special else len(tokenizer.decode([target]).encode("utf-8"))
            if weight:
                nats -= float(log_probs[position, target])
                tokens += 1
                n_bytes += weight
    return nats / tokens, nats / (math.log(2) * n_bytes)


def test_eval_and_training_validation_agree_with_the_definition(model_and_tokenizer, accelerator):
    model, tokenizer = model_and_tokenizer
    loss, bpb = _by_hand(model, tokenizer, loops=3)

    evaluated = bits_per_byte(model, tokenizer, DOCUMENTS, num_loops=3, batch_size=2, progress=False)
    assert evaluated["loss"] == pytest.approx(loss, rel=1e-5)
    assert evaluated["bpb"] == pytest.approx(bpb, rel=1e-5)

    documents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in DOCUMENTS]
    metrics = validation_metrics(model, accelerator, documents,
                                 token_byte_lengths(tokenizer, model.config.vocab_size), depths=[3], batch_size=2,
                                 pad_id=0)
    assert metrics["val/loss@3"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/bpb@3"] == pytest.approx(bpb, rel=1e-5)


def test_pad_right_masks_exactly_the_padding():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
