"""Random tiny Parcae model: the lm-eval path (``--model parcae``) equals the reference scorer per task for every
available task; ``parcae eval`` end to end; ``parcae compare``; bits-per-byte."""

import json
import logging
import math

import pytest
import torch

from conftest import EXCERPT, FIXTURES, tiny_eval_model


@pytest.fixture(scope="module")
def tiny():
    """Random released-style model with a short context (96) so that many few-shot prompts get cropped."""
    return tiny_eval_model(seed=0, context=96)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tokenizer = tiny
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lm_eval_path_equals_reference_scorer(bundle, tiny):
    from modeling_parcae.eval.bundle import split_available
    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.reference import score_task
    from modeling_parcae.eval.runner import build_tasks, run_lm_eval
    from modeling_parcae.eval.specs import CORE_EXTENDED_LABELS

    model, tokenizer = tiny
    labels = split_available(bundle, list(CORE_EXTENDED_LABELS))[0]
    lm = ParcaeLM(model, tokenizer=tokenizer, num_loops=2, batch_size=32)
    results = run_lm_eval(lm, build_tasks(labels, bundle, 8), seed=2345, log_samples=True)
    assert set(results) == set(labels)
    for label in labels:
        ref = score_task(model, tokenizer, bundle, label, seed=2345, limit=8, num_loops=2)
        mine = results[label]
        for sample, ref_scores in zip(mine["samples"], ref["scores"]):
            losses = ref_scores["mean_loss"] if isinstance(ref_scores["mean_loss"], list) else [ref_scores["mean_loss"]]
            assert sample["mean_loss"] == pytest.approx(losses, abs=1e-5), label
        assert mine["acc"] == ref["acc"], label
    assert any(results[label]["acc"] > 0 for label in labels)


def test_depth_changes_scores(bundle, tiny):
    """num_loops reaches the model: different depths give different option scores."""
    from modeling_parcae.eval.reference import score_task

    model, tokenizer = tiny
    one = score_task(model, tokenizer, bundle, "copa", limit=4, num_loops=1)["scores"]
    four = score_task(model, tokenizer, bundle, "copa", limit=4, num_loops=4)["scores"]
    assert one[0]["mean_loss"] != pytest.approx(four[0]["mean_loss"], abs=1e-6)


def test_cli_end_to_end(bundle, tiny_dir, tmp_path, caplog):
    """--num-loops 1,2 --limit 5: JSON (issue schema), markdown table, PNG, fit parameters, and a warning naming
    the tasks whose data file is missing (hellaswag is not in the shared bundle)."""
    from modeling_parcae.cli import main

    out = tmp_path / "run" / "tiny.json"
    text = tmp_path / "val.txt"
    text.write_text(EXCERPT.read_text()[:4000])
    with caplog.at_level(logging.WARNING):
        code = main(["eval", "--model", str(tiny_dir), "--tasks", "copa,winograd,lambada_openai,hellaswag,bpb",
                     "--num-loops", "1,2", "--limit", "5", "--seeds", "1234,2345", "--bundle", str(bundle),
                     "--text", str(text), "--output", str(out)])
    assert code == 0
    assert "hellaswag" in caplog.text and "missing" in caplog.text
    report = json.loads(out.read_text())
    assert report["baselines"] == "v1" and report["seeds"] == [1234, 2345] and report["skipped"] == ["hellaswag"]
    assert set(report["results"]) == {"1", "2"}
    for depth in ("1", "2"):
        entry = report["results"][depth]
        assert set(entry["tasks"]) == {"copa", "winograd", "lambada_openai"}
        for row in entry["tasks"].values():
            assert set(row) >= {"acc", "acc_std", "centered"}
        copa = entry["tasks"]["copa"]
        assert copa["centered"] == pytest.approx((copa["acc"] - 0.5) / 0.5)
        assert -100 <= entry["core"] <= 100 and "core_std" in entry
        assert entry["bpb"]["bpb"] > 0 and entry["bpb"]["loss"] > 0
    fit = report["fit"]["core"]
    assert {"S_inf", "S0", "k"} <= set(fit) and fit["underdetermined"] is True
    assert out.with_suffix(".md").read_text().count("| copa |") == 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_single_depth_writes_no_plot(tiny_dir, tmp_path):
    """One depth: the JSON and the table, but no plot against num_loops (a single point)."""
    from modeling_parcae.cli import main

    out = tmp_path / "one.json"
    text = tmp_path / "val.txt"
    text.write_text(EXCERPT.read_text()[:2000])
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "bpb", "--text", str(text), "--num-loops", "2",
                 "--output", str(out)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"2"}
    assert out.with_suffix(".md").exists() and not out.with_suffix(".png").exists()


def test_cli_bad_inputs(tmp_path, capsys, bundle, tiny_dir):
    from modeling_parcae.cli import main

    assert main(["eval", "--model", str(tiny_dir), "--tasks", "core,not_a_task", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "not_a_task" in err and "arc_easy" in err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "copa", "--bundle", str(tmp_path / "empty")]) == 2
    assert "core.yaml is missing" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "hellaswag,squad", "--bundle", str(bundle)]) == 2
    assert "none of the requested tasks" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--tasks", "bpb", "--bundle", str(bundle)]) == 2
    assert "--text" in capsys.readouterr().err


def test_compare_prints_differences(tmp_path, capsys):
    from modeling_parcae.cli import main

    def report(model, acc, core):
        return {"model": model, "baselines": "v1", "seeds": [1234],
                "results": {"4": {"tasks": {"copa": {"acc": acc, "acc_std": 0.0, "centered": 2 * acc - 1}},
                                  "core": core, "core_std": 0.0}}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report("transformer", 0.55, 10.0)))
    b.write_text(json.dumps(report("parcae", 0.60, 12.5)))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    copa = next(line for line in out.splitlines() if line.startswith("copa"))
    assert copa.split()[1:] == ["55.00", "60.00", "+5.00"]
    core = next(line for line in out.splitlines() if line.startswith("CORE"))
    assert core.split()[1:] == ["10.00", "12.50", "+2.50"]


def test_bits_per_byte_definition(tiny):
    """Bytes counted = UTF-8 bytes of every predicted token (all but the first), and bpb = loss·tokens/(ln2·bytes)."""
    from modeling_parcae.eval.bpb import bits_per_byte

    model, tokenizer = tiny
    docs = ["To be, or not to be: that is the question.", "Whether 'tis nobler in the mind to suffer"]
    out = bits_per_byte(model, tokenizer, docs, num_loops=2, progress=False)
    first_bytes = sum(len(tokenizer.decode([tokenizer(d, add_special_tokens=False)["input_ids"][0]]).encode())
                      for d in docs)
    assert out["bytes"] == sum(len(d.encode()) for d in docs) - first_bytes
    assert out["bpb"] == pytest.approx(out["loss"] * out["tokens"] / (math.log(2) * out["bytes"]))
    # a uniform predictor would give ln(V) nats per token; a random model is near that
    assert abs(out["loss"] - math.log(model.config.vocab_size)) < 1.5


def test_lm_eval_groups_average_centered_accuracy(bundle, tiny, tmp_path):
    """Plain lm-eval groups ``core`` / ``core_extended`` = unweighted mean of the tasks' centered accuracy. The files
    absent from the shared bundle are stood in by a few synthetic items (in a temporary copy)."""
    import shutil
    import statistics

    import lm_eval
    from lm_eval.tasks import TaskManager

    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.runner import TASKS_DIR
    from modeling_parcae.eval.specs import GROUPS, MC, TASKS

    full = tmp_path / "bundle"
    shutil.copytree(bundle, full, symlinks=True)
    for spec in TASKS.values():
        path = full / "eval_data" / spec.dataset_uri
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [{"query": f"Q{i}", "choices": ["a", "b c"], "gold": i % 2} if spec.task_type == MC
                    else {"context": f"C{i}", "continuation": "x y"} for i in range(12)]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = tiny
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"bundle": str(full), "max_per_task": 3})
    for group, labels in GROUPS.items():
        out = lm_eval.simple_evaluate(model=ParcaeLM(model, tokenizer=tokenizer, num_loops=1, batch_size=64),
                                      tasks=[group], task_manager=manager, bootstrap_iters=0)["results"]
        tasks = [out[f"core_{label}"] for label in labels]
        for label, row in zip(labels, tasks):
            b = {"boolq": 0.62, "copa": 0.5, "bigbench_language_identification": 0.091}.get(label)
            if b is not None:
                assert row["acc_centered,none"] == pytest.approx((row["acc,none"] - b) / (1 - b))
        assert out[group]["acc_centered,none"] == pytest.approx(statistics.fmean(r["acc_centered,none"] for r in tasks))


def test_stock_hf_model_runs_the_tasks(bundle, tiny):
    """The stock lm-eval ``HFLM`` also runs the task YAMLs (its scoring differs: summed log-probs, see
    docs/evaluation.md); its multiple-choice scores are summed log-probs, hence not the parcae model's means."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.runner import build_tasks, run_lm_eval

    model, tokenizer = tiny
    tasks = build_tasks(["copa", "winograd", "lambada_openai"], bundle, 5)
    stock = HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=True, max_length=96, batch_size=8)
    out = lm_eval.simple_evaluate(model=stock, tasks=list(tasks.values()), bootstrap_iters=0, log_samples=True)
    assert {"core_copa", "core_winograd", "core_lambada_openai"} <= set(out["results"])
    ours = run_lm_eval(ParcaeLM(model, tokenizer=tokenizer), tasks, seed=1234, log_samples=True)
    stock_copa = [-float(r[0]) for r in sorted(out["samples"]["core_copa"], key=lambda s: s["doc_id"])[0]["filtered_resps"]]
    assert stock_copa != pytest.approx(ours["copa"]["samples"][0]["mean_loss"], abs=1e-3)


def test_transformer_baseline_evaluates_once_for_all_depths(bundle):
    """A fixed-depth model (the paper's Transformer baseline) runs through the same code; depths repeat its numbers."""
    from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer
    from modeling_parcae.eval.runner import evaluate

    torch.manual_seed(1)
    config = ParcaeConfig(vocab_size=288, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          num_prelude_layers=3, num_core_layers=0, num_coda_layers=0,
                          max_position_embeddings=96, looped=False)
    model = ParcaeForCausalLM(config).eval()
    tokenizer = load_official_tokenizer(FIXTURES / "golden" / "tokenizer", 96)
    report = evaluate(model, tokenizer, model_name="gpt", labels=["copa", "boolq"], bundle=bundle, seeds=[1234],
                      loops=[1, 4], limit=4)
    assert report["looped"] is False
    assert report["results"]["1"] == report["results"]["4"] and "core" in report["results"]["1"]


def test_lm_eval_model_args_pretrained_demo_is_the_bundled_demo(tmp_path, monkeypatch):
    """Issue 36: `lm_eval --model parcae --model_args pretrained=demo` looked for a Hub repo named demo, while
    `parcae generate --model demo` and `parcae eval --model demo` take the bundled model."""
    from lm_eval.api.registry import get_model

    import modeling_parcae.eval.lm  # noqa: F401  registers the `parcae` lm-eval model
    from modeling_parcae import ParcaeConfig, demo_model_path

    monkeypatch.chdir(tmp_path)  # no local folder named demo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = get_model("parcae").create_from_arg_string("pretrained=demo,num_loops=2")
    demo = ParcaeConfig.from_pretrained(demo_model_path())
    assert lm.model.config.hidden_size == demo.hidden_size and lm.model.config.vocab_size == demo.vocab_size
    assert lm.model.name_or_path == str(demo_model_path())
