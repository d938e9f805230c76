"""GPU-style scoring batches (rows packed by length up to a padded-token budget derived from device memory, as
``parcae eval`` does on CUDA), exercised on CPU: per-item results equal the unbatched paths, and the report's CORE is
identical."""

import os

import pytest
import torch

from conftest import tiny_eval_model

# one task of each kind: 0-shot and 10-shot multiple choice (shared prefix), schema (shared suffix), language modelling
LABELS = ["copa", "arc_easy", "winograd", "lambada_openai", "bigbench_dyck_languages"]
LIMIT = 8
# "free memory" handed to the budget: 250-500 padded tokens per batch for this model (context 96), so batches hold
# several documents, are cut by the budget, and the longest multiple-choice documents run alone over it
FREE_BYTES = 4_000_000


@pytest.fixture(scope="module")
def tiny():
    return tiny_eval_model(seed=3, context=96)


def _budget(model, depths):
    from modeling_parcae.eval.row_scoring import memory_token_budget

    return memory_token_budget(model, depths, free_bytes=FREE_BYTES)


def _samples(model, tokenizer, bundle, *, batch_size, max_batch_tokens, loops=2):
    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.runner import build_tasks, run_lm_eval

    lm = ParcaeLM(model, tokenizer=tokenizer, num_loops=loops, batch_size=batch_size,
                  max_batch_tokens=max_batch_tokens)
    return run_lm_eval(lm, build_tasks(LABELS, bundle, LIMIT), seed=1234, log_samples=True)


def test_budget_packs_documents_by_padded_tokens():
    """Batches hold whole documents, as many as fit in the padded-token budget (one over it runs alone), and a row
    bound still applies when given."""
    from modeling_parcae.eval.row_scoring import Row, _batches, _Document, _tokens

    lengths = [90, 80, 40, 30, 30, 20, 10, 10, 10, 10]
    docs = [_Document([Row(list(range(n)), 1, n)], i, 0) for i, n in enumerate(lengths)]
    batches = _batches(docs, None, 96, max_batch_tokens=100)
    assert [[d.index for d in b] for b in batches] == [[0], [1], [2, 3], [4, 5, 6], [7, 8, 9]]
    assert all(_tokens(b) <= 100 for b in batches)
    assert [len(b) for b in _batches(docs, 2, 96, max_batch_tokens=100)] == [1, 1, 2, 2, 2, 2]
    assert [len(b) for b in _batches(docs, None, 96, max_batch_tokens=50)] == [1, 1, 1, 1, 1, 2, 3]


def test_budget_grows_with_free_memory_and_shrinks_with_depths_and_width(tiny):
    from modeling_parcae.eval.row_scoring import bytes_per_token, memory_token_budget

    model, _ = tiny
    assert memory_token_budget(model, [2], free_bytes=2 * FREE_BYTES) > memory_token_budget(model, [2], FREE_BYTES)
    assert bytes_per_token(model, [1, 2, 4, 8]) > bytes_per_token(model, [8]) > bytes_per_token(model, [1])
    assert bytes_per_token(model.to(torch.bfloat16), [2]) < bytes_per_token(model.float(), [2])


def test_gpu_style_batches_equal_the_reference_scorer(tiny, bundle):
    """fp32: every item's option scores equal the per-item reference scorer (one forward per item, no cache) within
    1e-5, and every item's correctness is the same."""
    from modeling_parcae.eval.reference import score_task

    model, tokenizer = tiny
    batched = _samples(model, tokenizer, bundle, batch_size=None, max_batch_tokens=_budget(model, [2]))
    for label in LABELS:
        reference = score_task(model, tokenizer, bundle, label, seed=1234, limit=LIMIT, num_loops=2)
        mine = batched[label]["samples"]
        assert [bool(s["acc"]) for s in mine] == reference["correct"], label
        for sample, scores in zip(mine, reference["scores"]):
            losses = scores["mean_loss"] if isinstance(scores["mean_loss"], list) else [scores["mean_loss"]]
            assert sample["mean_loss"] == pytest.approx(losses, abs=1e-5), label


def test_gpu_style_report_equals_the_unbatched_report(tiny, bundle):
    """The whole report of a depth sweep (one pass for every depth): per-task accuracies and CORE / Core-Extended
    identical between one row per forward and budget-packed batches."""
    from modeling_parcae.eval.runner import evaluate

    model, tokenizer = tiny
    common = dict(model_name="tiny", labels=LABELS, bundle=bundle, seeds=[1234], loops=[1, 3], limit=LIMIT)
    one_row = evaluate(model, tokenizer, batch_size=1, **common)
    packed = evaluate(model, tokenizer, batch_size=None, max_batch_tokens=_budget(model, [1, 3]), **common)
    for depth in ("1", "3"):
        assert packed["results"][depth]["core"] == one_row["results"][depth]["core"]
        assert packed["results"][depth]["core_extended"] == one_row["results"][depth]["core_extended"]
        assert {k: v["acc"] for k, v in packed["results"][depth]["tasks"].items()} == {
            k: v["acc"] for k, v in one_row["results"][depth]["tasks"].items()}


# mean nats per token. On this CPU the two batchings give bit-identical bf16 scores; GPU kernels pick their reduction
# order by shape, so a batch may round differently there, by about bf16's 2^-8 relative step of the activations
BF16_LOSS_TOLERANCE = 0.02


def test_bf16_gpu_style_batches_agree_with_one_row_per_forward(tiny, bundle):
    """bfloat16 (the GPU default): batching changes only the rounding of the sums, so option scores agree within
    BF16_LOSS_TOLERANCE, and an item's correctness is the same wherever its best option leads by more than twice it."""
    model, tokenizer = tiny
    model = model.to(torch.bfloat16)
    try:
        one_row = _samples(model, tokenizer, bundle, batch_size=1, max_batch_tokens=None)
        packed = _samples(model, tokenizer, bundle, batch_size=None, max_batch_tokens=_budget(model, [2]))
    finally:
        model.float()
    decided = 0
    for label in LABELS:
        for a, b in zip(one_row[label]["samples"], packed[label]["samples"]):
            assert b["mean_loss"] == pytest.approx(a["mean_loss"], abs=BF16_LOSS_TOLERANCE), label
            losses = sorted(a["mean_loss"])
            if len(losses) > 1 and losses[1] - losses[0] > 2 * BF16_LOSS_TOLERANCE:
                assert a["acc"] == b["acc"], label
                decided += 1
            if len(losses) == 1:
                assert a["acc"] == b["acc"], label  # greedy exact match on a random model: never close to flipping
    assert decided >= 5


def test_out_of_memory_halves_the_budget_and_finishes(tiny, bundle):
    """A batch over what the device holds (simulated: a forward over more than 600 tokens raises CUDA's out-of-memory
    error) is retried with half the budget; the scores are those of an unconstrained run."""
    model, tokenizer = tiny
    free = _samples(model, tokenizer, bundle, batch_size=None, max_batch_tokens=4000)
    calls = {"refused": 0}

    def device_of_200_tokens(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.numel() > 600:
            calls["refused"] += 1
            raise torch.cuda.OutOfMemoryError("simulated: tried to allocate more than the device has")

    handle = model.register_forward_pre_hook(device_of_200_tokens, with_kwargs=True)
    try:
        small = _samples(model, tokenizer, bundle, batch_size=None, max_batch_tokens=4000)
    finally:
        handle.remove()
    assert calls["refused"] > 0
    for label in LABELS:
        assert [s["acc"] for s in small[label]["samples"]] == [s["acc"] for s in free[label]["samples"]]
        for a, b in zip(small[label]["samples"], free[label]["samples"]):
            assert a["mean_loss"] == pytest.approx(b["mean_loss"], abs=1e-5)


def test_prompts_tokenize_in_parallel_and_the_setting_is_restored(tiny, monkeypatch):
    """One batch of prompts goes through the Rust tokenizer with its parallelism on; afterwards the variable is back
    (unset becomes "false", so later forks neither reuse the pool nor warn)."""
    from modeling_parcae.eval import lm as lm_module

    model, tokenizer = tiny
    seen = []
    encode = lm_module.encode_with_bos

    def watching(tok, texts):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return encode(tok, texts)

    monkeypatch.setattr(lm_module, "encode_with_bos", watching)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    parcae = lm_module.ParcaeLM(model, tokenizer=tokenizer)
    parcae._plan_rows({("multiple_choice", (("Q: a or b?", " a"), ("Q: a or b?", " b")))})
    assert seen == ["true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    parcae._plan_rows({("multiple_choice", (("Q: c or d?", " c"), ("Q: c or d?", " d")))})
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
