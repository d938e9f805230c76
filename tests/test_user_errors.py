"""Rough edges a new user hit, each answered by one clear message naming the file, path or key at fault."""

import json
from pathlib import Path

import pytest

from modeling_parcae.eval.procedure import load_items
from modeling_parcae.eval.specs import TASKS


def _bundle_with(tmp_path: Path, labels: list[str]) -> Path:
    bundle = tmp_path / "bundle"
    for label in labels:
        path = bundle / "eval_data" / TASKS[label].dataset_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    (bundle / "core.yaml").write_text("icl_tasks: []\n")
    return bundle


def test_missing_task_data_names_the_file_the_tasks_that_cannot_run_and_those_that_can(tmp_path):
    bundle = _bundle_with(tmp_path, ["copa", "piqa"])
    with pytest.raises(FileNotFoundError) as error:
        load_items(bundle, TASKS["mmlu_zeroshot"])
    message = str(error.value)
    assert f"has no eval_data/{TASKS['mmlu_zeroshot'].dataset_uri}" in message
    assert "lacks the data of 44 of 46 tasks" in message and "core_hellaswag" in message
    assert "--tasks core_copa,core_piqa" in message or "--tasks core_piqa,core_copa" in message
