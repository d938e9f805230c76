"""Against the official evaluator: the golden ``core_eval`` checkpoint, converted with the project's converter,
scored by ``parcae eval --tasks core_extended --num-loops 2,4 --limit 20 --seeds 1234 --dtype float32`` (lm-eval path,
a one-pass depth sweep with shared few-shot prefixes)
and by the reference scorer must reproduce ``reference.json``: per-task accuracy and per-item option scores (1e-4),
including prompts cropped from the left at the model's 768-token limit."""

import json

import pytest

from conftest import REPO_ROOT, SHARED

BUNDLE = SHARED / "eval_bundle"
CORE_EVAL = SHARED / "golden" / "core_eval"
TOL = 1e-4
TIE = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden():
    if not (BUNDLE / "core.yaml").is_file() or not (CORE_EVAL / "reference.json").is_file():
        pytest.skip(f"{BUNDLE} or {CORE_EVAL} is absent: the golden CORE check needs ../shared")
    return json.loads((CORE_EVAL / "reference.json").read_text())


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory):
    from modeling_parcae.conversion.convert import convert_official_to_transformers

    out = tmp_path_factory.mktemp("core_eval") / "hf"
    convert_official_to_transformers(CORE_EVAL / "model", out, tokenizer_source=CORE_EVAL / "tokenizer")
    return out


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _check_task(label, expected, acc, items):
    """``items``: per item (option mean losses, correct). Ties in the reference are compared by score only."""
    assert len(items) == len(expected["scores"]), label
    correct_mismatch = 0
    for i, ((losses, correct), ref) in enumerate(zip(items, expected["scores"])):
        ref_losses = _as_list(ref["mean_loss"])
        assert losses == pytest.approx(ref_losses, abs=TOL), f"{label} item {i}"
        tie = len(ref_losses) > 1 and sorted(ref_losses)[1] - min(ref_losses) < TIE
        if not tie:
            assert correct == expected["correct"][i], f"{label} item {i}"
        correct_mismatch += correct != expected["correct"][i]
    if correct_mismatch == 0:
        assert acc == pytest.approx(expected["acc"], abs=1e-12), label


def test_official_cropping_is_exercised(golden):
    """The reference data really contains left-cropped prompts, so matching it proves the crop."""
    cropped = [c for t in golden["tasks"].values() for s in t["scores"] for c in _as_list(s["cropped"]) if c > 0]
    assert len(cropped) > 100


def test_cli_lm_eval_path_reproduces_official(golden, converted, tmp_path):
    from modeling_parcae.cli import main

    out = tmp_path / "golden.json"
    # a depth sweep: depth 4 is read from the same one-pass forward as depth 2 (output_depths), and must still match
    code = main(["eval", "--model", str(converted), "--tasks", "core_extended", "--num-loops", "2,4", "--limit", "20",
                 "--seeds", "1234", "--dtype", "float32", "--bundle", str(BUNDLE), "--batch-size", "32",
                 "--output", str(out), "--log-samples"])
    assert code == 0
    report = json.loads(out.read_text())
    samples = json.loads(out.with_suffix(".samples.json").read_text())["4"]["1234"]
    assert sorted(report["skipped"]) == sorted(golden["skipped"])
    tasks = report["results"]["4"]["tasks"]
    assert set(tasks) == set(golden["tasks"])
    for label, expected in golden["tasks"].items():
        items = [(s["mean_loss"], bool(s["acc"])) for s in samples[label]]
        _check_task(label, expected, tasks[label]["acc"], items)


def test_reference_scorer_reproduces_official(golden, converted):
    from modeling_parcae.eval.modelio import load_model_and_tokenizer
    from modeling_parcae.eval.reference import score_task

    model, tokenizer = load_model_and_tokenizer(str(converted))
    assert model.config.max_position_embeddings == golden["max_seq_len"]
    for label, expected in golden["tasks"].items():
        got = score_task(model, tokenizer, BUNDLE, label, seed=golden["seed"], limit=golden["limit"],
                         num_loops=golden["num_loops"])
        for mine, ref in zip(got["scores"], expected["scores"]):
            assert mine["cropped"] == ref["cropped"] and mine["prompt_tokens"] == ref["prompt_tokens"], label
        items = [(_as_list(s["mean_loss"]), c) for s, c in zip(got["scores"], got["correct"])]
        _check_task(label, expected, got["acc"], items)
