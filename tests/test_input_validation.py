"""Malformed inputs to the model are refused with a ValueError naming the argument, never silently used: an attention
mask of the wrong length used to change the logits without a word; invalid loop counts are refused when loading."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from modeling_parcae import ParcaeForCausalLM

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))


def test_valid_masks_are_accepted_and_padding_changes_nothing_for_real_tokens(model, ids):
    with torch.no_grad():
        plain = model(ids, num_loops=2).logits
        ones = model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long), num_loops=2).logits
        float_ones = model(ids, attention_mask=torch.ones(2, 5), num_loops=2).logits
    assert torch.allclose(plain, ones, atol=1e-6) and torch.allclose(plain, float_ones, atol=1e-6)


@pytest.mark.parametrize("length", [3, 4, 6, 9])
def test_attention_mask_of_the_wrong_length_is_refused(model, ids, length):
    with pytest.raises(ValueError, match=rf"attention_mask has length {length}; expected the input length 5"):
        model(ids, attention_mask=torch.ones(2, length, dtype=torch.long))


def test_attention_mask_may_cover_cached_plus_new_tokens_only(model, ids):
    with torch.no_grad():
        out = model(ids, num_loops=2, use_cache=True)
        step = torch.tensor([[7], [9]])
        model(step, attention_mask=torch.ones(2, 6, dtype=torch.long), past_key_values=out.past_key_values,
              num_loops=2, use_cache=True)  # cached 5 + 1 new
        with pytest.raises(ValueError, match=r"expected the input length 1 or cached \+ input length 7"):
            model(step, attention_mask=torch.ones(2, 4, dtype=torch.long), past_key_values=out.past_key_values,
                  num_loops=2, use_cache=True)


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan")])
def test_float_mask_with_values_other_than_zero_and_one_is_refused(model, ids, value):
    mask = torch.ones(2, 5)
    mask[0, 0] = value
    with pytest.raises(ValueError, match="attention_mask holds 1 .* and 0"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda ids: ids + VOCAB, r"input_ids must lie in \[0, vocab_size=256\)"),
        (lambda ids: ids - VOCAB, r"input_ids must lie in \[0, vocab_size=256\)"),
        (lambda ids: ids.float(), r"input_ids must hold integer token ids, got dtype torch.float32"),
        (lambda ids: ids[:, :0], r"the input is empty: batch 2, seq_len 0"),
        (lambda ids: ids.tolist(), r"input_ids must be a torch.Tensor, got list"),
        (lambda ids: ids[0], r"input_ids must have shape \(batch, seq_len\)"),
    ],
    ids=["above-vocab", "negative", "float", "empty", "list", "1-d"],
)
def test_bad_token_ids_are_a_value_error_naming_the_argument(model, ids, change, message):
    with pytest.raises(ValueError, match=message):
        model(change(ids))


def test_mismatched_batch_sizes_are_refused(model, ids):
    with pytest.raises(ValueError, match="attention_mask has batch size 3, input has 2"):
        model(ids, attention_mask=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"initial_state must have shape .* = \(2, 5, 64\), got \(3, 5, 64\)"):
        model(ids, initial_state=torch.zeros(3, 5, 64))
    with pytest.raises(ValueError, match="attention_mask must be a torch.Tensor, got list"):
        model(ids, attention_mask=[[1] * 5] * 2)


def test_generate_still_works_with_the_checks(model, ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, num_loops=2)
    assert out.shape == (2, 8)


def test_invalid_num_loops_is_refused_at_load_time(tmp_path, model):
    model.save_pretrained(tmp_path / "saved")
    for bad in (0, -2, 2.5):
        with pytest.raises(Exception, match="num_loops"):
            ParcaeForCausalLM.from_pretrained(tmp_path / "saved", num_loops=bad)


def test_save_pretrained_with_an_invalid_config_writes_nothing(tmp_path):
    model = tiny_model()
    model.config.num_loops = 0  # edited after loading, past the config's validation
    with pytest.raises(Exception, match="num_loops must be >= 1"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # before: a directory holding only the remote-code .py files


def test_generating_past_the_trained_context_warns_once_not_per_decode_step():
    """The warning's text once named the length, so ``warning_once`` printed a new one at every decode step."""
    from transformers.testing_utils import CaptureLogger

    from modeling_parcae.modeling_parcae import logger

    model = tiny_model(max_position_embeddings=8).eval()
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        model.generate(torch.tensor([[5, 17, 99, 3, 250, 42, 7]]), max_new_tokens=10, do_sample=False, num_loops=2)
    assert captured.out.count("max_position_embeddings=8") == 1, captured.out


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_refuses_a_cache_that_is_no_transformers_cache_as_forward_does(model, ids, name):
    with pytest.raises(TypeError, match="the KV cache must be a transformers Cache .* got dict"):
        model.generate(ids, max_new_tokens=2, num_loops=2, **{name: {}})


def test_an_empty_row_in_a_batch_is_refused_as_an_empty_prompt_alone_is(model):
    ids = torch.tensor([[2, 2, 5, 17], [2, 2, 2, 2]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="row 1 of the batch has no token"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_loops=2)


def test_a_non_finite_initial_state_is_refused(model, ids):
    state = torch.zeros(*ids.shape, model.config.state_size)
    state[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="initial_state holds NaN or infinite values"):
        model(ids, initial_state=state, num_loops=2)


def test_labels_outside_the_vocabulary_name_the_labels(model, ids):
    labels = ids.clone()
    labels[0, 2] = model.config.vocab_size + 5
    with pytest.raises(ValueError, match=r"labels \(other than -100\) must lie in \[0, vocab_size"):
        model(ids, labels=labels, num_loops=2)


def test_the_float16_training_check_scans_the_parameters_once_per_entry_into_training_mode():
    """``Trainer`` calls ``model.train()`` before every step: the scan of every parameter ran on each forward."""
    model = tiny_model()
    scans = []
    named_parameters = model.named_parameters
    model.named_parameters = lambda *args, **kwargs: scans.append(1) or named_parameters(*args, **kwargs)
    ids = torch.randint(0, VOCAB, (2, 5))
    for _ in range(3):
        model.train()
        model(ids, labels=ids, num_loops=2).loss.backward()
    assert len(scans) == 1
    model.eval()
    model.train()
    model(ids, labels=ids, num_loops=2)
    assert len(scans) == 2
    model.half()
    with pytest.raises(ValueError, match="trainable parameters are float16"):
        model.eval().train()(ids, labels=ids, num_loops=2)
