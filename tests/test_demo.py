"""The bundled demo model: present, small, deterministic, and better with more loops on held-out text."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modeling_parcae import ParcaeForCausalLM
from modeling_parcae.eval.bpb import bits_per_byte, read_documents
from modeling_parcae.bundled import demo_model_path


@pytest.fixture(scope="module")
def demo():
    path = demo_model_path()
    assert path is not None, "modeling_parcae/demo is missing: build it with scripts/build_demo.py"
    model = ParcaeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def test_demo_ships_small_fp16_weights(demo):
    path, model, _ = demo
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 8 * 2**20
    assert sum(f.stat().st_size for f in path.iterdir()) <= 8 * 2**20
    assert model.config.injection_type == "diagonal" and model.config.mean_recurrence == 8


def test_greedy_generation_is_deterministic_at_1_and_8_loops(demo):
    _, model, tokenizer = demo
    ids = tokenizer("ROMEO:", return_tensors="pt")
    outputs = {}
    for loops in (1, 8):
        runs = [model.generate(**ids, num_loops=loops, max_new_tokens=20, do_sample=False) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
        outputs[loops] = runs[0]
        assert len(tokenizer.decode(runs[0][0, ids.input_ids.shape[1]:]).strip()) > 0
    assert not torch.equal(outputs[1], outputs[8])


def test_held_out_loss_is_lower_at_8_loops_than_at_1(demo):
    path, model, tokenizer = demo
    documents = read_documents(path / "heldout.txt")
    loss = {loops: bits_per_byte(model, tokenizer, documents, num_loops=loops, progress=False)["loss"]
            for loops in (1, 8)}
    assert loss[8] < loss[1], loss


@pytest.mark.versions
def test_demo_generates_alike_cached_and_uncached_and_reports_it_to_the_version_lane(demo):
    """The demo's greedy continuation at 4 loops (fp32), cached and uncached, and the logits of its last step. The
    version lane (``PARCAE_LANE_REPORT`` set) collects them from every transformers release and requires them equal."""
    _, model, tokenizer = demo
    ids = tokenizer(["ROMEO:", "JULIET: O"], return_tensors="pt", padding=True, padding_side="left")
    runs = {use_cache: model.generate(**ids, num_loops=4, max_new_tokens=16, do_sample=False, use_cache=use_cache,
                                      return_dict_in_generate=True, output_logits=True) for use_cache in (True, False)}
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(runs[True].logits[-1], runs[False].logits[-1], atol=1e-4, rtol=0)
    report = os.environ.get("PARCAE_LANE_REPORT")
    if report:
        Path(report).write_text(json.dumps({"tokens": runs[True].sequences.tolist(),
                                            "last_logits": runs[True].logits[-1].tolist()}))
