"""The lm-eval task definitions: same prompts as the reference scorer (char for char), task table = bundle YAMLs,
official ``max_per_task`` semantics, centered accuracy and group averages from the bundle's baselines."""

import collections
import csv
import random

import pytest
import yaml



def _available(bundle):
    from modeling_parcae.eval.bundle import split_available
    from modeling_parcae.eval.specs import CORE_EXTENDED_LABELS

    return split_available(bundle, list(CORE_EXTENDED_LABELS))[0]


def test_task_table_matches_bundle_yaml(bundle):
    from modeling_parcae.eval.specs import CORE_LABELS, TASKS

    for name, expected_count in (("core.yaml", 22), ("core_extended.yaml", 46)):
        rows = yaml.safe_load((bundle / name).read_text())["icl_tasks"]
        assert len(rows) == expected_count
        for row in rows:
            spec = TASKS[row["label"]]
            assert (spec.dataset_uri, spec.task_type, spec.num_fewshot, spec.delimiter) == (
                row["dataset_uri"], row["icl_task_type"], row["num_fewshot"][0],
                row.get("continuation_delimiter", " "))
    core = {row["label"] for row in yaml.safe_load((bundle / "core.yaml").read_text())["icl_tasks"]}
    assert set(CORE_LABELS) == core and len(TASKS) == 46


def test_committed_yamls_are_generated_and_complete():
    from modeling_parcae.eval import generate_tasks
    from modeling_parcae.eval.specs import GROUPS, TASKS

    for label in TASKS:
        path = generate_tasks.TASKS_DIR / f"core_{label}.yaml"
        assert path.read_text() == generate_tasks.task_yaml(label)
    for group, labels in GROUPS.items():
        assert (generate_tasks.TASKS_DIR / f"{group}.yaml").read_text() == generate_tasks.group_yaml(group, labels)


def test_prompts_equal_reference_for_every_available_task(bundle):
    """lm-eval's rendered requests == the reference scorer's Jinja prompts, several items and two seeds per task."""
    from modeling_parcae.eval.lm import core_prompt_strings
    from modeling_parcae.eval.procedure import load_items
    from modeling_parcae.eval.reference import render_prompts
    from modeling_parcae.eval.runner import build_tasks
    from modeling_parcae.eval.specs import TASKS

    labels = _available(bundle)
    assert len(labels) == 38
    limit, checked = 40, 0
    tasks = build_tasks(labels, bundle, limit)
    for name, task in tasks.items():
        label = name.removeprefix("core_")
        spec = TASKS[label]
        items = load_items(bundle, spec, limit)
        for seed in (1234, 2345):
            task.set_fewshot_seed(seed)
            task.build_all_requests(limit=6)
            per_doc = collections.defaultdict(list)
            for inst in task.instances:
                per_doc[inst.doc_id].append(inst.args)
            assert len(per_doc) == 6
            for doc_id, args in per_doc.items():
                assert core_prompt_strings(spec.task_type, args) == render_prompts(spec, items, doc_id, seed), (
                    label, seed, doc_id)
                checked += 1
    assert checked == 38 * 2 * 6


def test_limit_follows_official_max_per_task(bundle):
    """Shuffle with Random(1337), keep the first N, draw shots with Random(seed + idx) from those N only."""
    import json

    from modeling_parcae.eval.reference import render_prompts
    from modeling_parcae.eval.runner import build_tasks
    from modeling_parcae.eval.specs import TASKS

    rows = [json.loads(line) for line in (bundle / "eval_data" / TASKS["arc_easy"].dataset_uri).open()]
    random.Random(1337).shuffle(rows)
    kept = rows[:15]
    task = build_tasks(["arc_easy"], bundle, 15)["core_arc_easy"]
    task.set_fewshot_seed(2345)
    task.build_all_requests(limit=None)
    assert len({inst.doc_id for inst in task.instances}) == 15
    context = next(inst.args[0] for inst in task.instances if inst.doc_id == 3)
    shots = random.Random(2345 + 3).sample([i for i in range(15) if i != 3], 10)
    expected_start = kept[shots[0]]["query"] + "\nAnswer: " + kept[shots[0]]["choices"][kept[shots[0]]["gold"]]
    assert context.startswith(expected_start + "\n\n")
    assert context.endswith(kept[3]["query"] + "\nAnswer:")
    assert render_prompts(TASKS["arc_easy"], kept, 3, 2345)[0].startswith(expected_start)


def _csv_baselines(path):
    with open(path, newline="") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}


def test_centered_accuracy_and_groups_use_bundle_baselines(bundle):
    from modeling_parcae.eval.aggregate import summarize_depth
    from modeling_parcae.eval.bundle import load_baselines

    v1 = _csv_baselines(bundle / "eval_meta_data.csv")
    v2 = _csv_baselines(bundle / "eval_meta_data_v2.csv")
    assert load_baselines(bundle, "v1")["boolq"] == v1["boolq"] == 0.62
    assert load_baselines(bundle, "v2")["commonsense_qa"] == pytest.approx(0.403)
    assert load_baselines(bundle, "v1")["bigbench_language_identification"] == pytest.approx(0.091)
    seeds = [{"boolq": 0.81, "copa": 0.60, "siqa": 0.5}, {"boolq": 0.62, "copa": 0.70, "siqa": 0.7}]
    out = summarize_depth(seeds, load_baselines(bundle, "v1"), extended=True)
    # hand-computed: boolq/copa are CORE, siqa (v1 baseline 0.333) only Core-Extended
    core_seed = [((0.81 - .62) / .38 + (0.6 - .5) / .5) / 2 * 100, ((0.62 - .62) / .38 + (0.7 - .5) / .5) / 2 * 100]
    assert out["core"] == pytest.approx(sum(core_seed) / 2)
    assert out["core_std"] == pytest.approx(abs(core_seed[0] - core_seed[1]) / 2)
    ext_seed = [(core_seed[0] * 2 / 100 + (0.5 - .333) / .667) / 3 * 100,
                (core_seed[1] * 2 / 100 + (0.7 - .333) / .667) / 3 * 100]
    assert out["core_extended"] == pytest.approx(sum(ext_seed) / 2)
    assert out["tasks"]["copa"] == pytest.approx({"acc": 0.65, "acc_std": 0.05, "centered": 0.3, "baseline": 0.5})
    out_v2 = summarize_depth(seeds, load_baselines(bundle, "v2"), extended=True)
    assert out_v2["tasks"]["siqa"]["centered"] == pytest.approx(((0.5 - v2["siqa"]) / (1 - v2["siqa"]) + 0.4) / 2)


def test_unknown_task_lists_available():
    from modeling_parcae.eval.specs import resolve_task_names

    with pytest.raises(ValueError, match="unknown task.*nonexistent_task.*Available.*core_extended.*arc_easy"):
        resolve_task_names(["core", "nonexistent_task"])
    assert resolve_task_names(["core_piqa", "copa"]) == ["copa", "piqa"]
    assert len(resolve_task_names(["core"])) == 22 and len(resolve_task_names(["core_extended"])) == 46
