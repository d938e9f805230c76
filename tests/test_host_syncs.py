"""A decode step's forward reads no tensor value on the host beyond what an unrolled Llama's does under the same
``generate`` call: on a GPU each such read (``bool(t)``, ``t.item()``, ``t.tolist()``, ``int(t)``) stalls the host
until the device has caught up, so the next step's kernels cannot be queued meanwhile. The checks that read values
run once per sequence, on its first forward."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads(counter: list[int]):
    """Count the calls of the tensor methods that copy a value to the host (each a device sync on an accelerator)."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(original):
        @functools.wraps(original)
        def read(self, *args, **kwargs):
            counter[0] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_reads_per_forward(model, input_ids, attention_mask, **kwargs) -> list[int]:
    """Host reads made inside each forward of a greedy ``generate`` (prefill first, then one per decode step)."""
    per_forward = []
    forward = model.forward

    @functools.wraps(forward)
    def counting_forward(*args, **forward_kwargs):
        counter = [0]
        with counting_host_reads(counter):
            out = forward(*args, **forward_kwargs)
        per_forward.append(counter[0])
        return out

    model.forward = counting_forward
    try:
        with torch.no_grad():
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                           pad_token_id=0, **kwargs)
    finally:
        del model.forward
    return per_forward


def unrolled_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("padded", [False, True], ids=["batch1-unpadded", "batch2-left-padded"])
def test_a_decode_step_reads_no_more_tensor_values_on_the_host_than_llama(padded):
    if padded:
        input_ids = torch.tensor([[0, 0, 5, 17, 99], [8, 1, 64, 33, 2]])
        attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    else:
        input_ids = torch.tensor([[5, 17, 99, 3, 250]])
        attention_mask = torch.ones_like(input_ids)
    ours = host_reads_per_forward(tiny_model().eval(), input_ids, attention_mask, num_loops=3)
    llama = host_reads_per_forward(unrolled_llama(), input_ids, attention_mask)
    assert len(ours) == len(llama) == 4
    assert max(ours[1:]) <= min(llama[1:]), (ours, llama)


def test_the_value_checks_still_run_on_a_sequence_first_forward_and_on_a_bad_decode_token():
    model = tiny_model().eval()
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size"):
        model.generate(torch.tensor([[5, vocab]]), max_new_tokens=2, num_loops=2)
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([[5, 17]]), cache=cache, use_cache=True, num_loops=2)
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size"):
            model(torch.tensor([[vocab + 3]]), cache=cache, use_cache=True, num_loops=2)
