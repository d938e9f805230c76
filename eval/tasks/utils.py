"""lm-eval hooks for the CORE / Core-Extended tasks (referenced from the task YAMLs with ``!function``).

The prompt is built by lm-eval itself from these pieces. Every CORE delimiter ends in exactly one space, so the
delimiter minus that space closes the context and the space is lm-eval's ``target_delimiter``: few-shot turns then
render ``query + delimiter + answer + "\\n\\n"`` and the scored request is ``(context, " " + option)``.
Run options arrive as lm-eval task metadata (``--metadata`` / ``TaskManager(metadata=...)``): ``bundle`` (directory,
else ``$PARCAE_EVAL_BUNDLE`` or the cached download), ``max_per_task`` (official ``--limit``), ``baselines``
(``v1`` default, or ``v2``).
"""

from __future__ import annotations

import random

import datasets
from lm_eval.api.samplers import ContextSampler

from modeling_parcae.eval.bundle import load_baselines, resolve_bundle
from modeling_parcae.eval.procedure import load_items
from modeling_parcae.eval.specs import LM, MC, SCHEMA, TASKS

DEFAULT_FEWSHOT_SEED = 1234


def load_dataset(label: str, bundle: str | None = None, max_per_task: int | None = None,
                 baselines: str = "v1", **_metadata) -> datasets.DatasetDict:
    """The task's items in official order as the ``test`` split, annotated with their index (few-shot RNG), type,
    delimiter and random baseline (centered accuracy)."""
    spec = TASKS[label]
    root = resolve_bundle(bundle)
    baseline = load_baselines(root, baselines)[label]
    limit = int(max_per_task) if max_per_task not in (None, "", "None") else None
    rows = [{**item, "_idx": i, "_type": spec.task_type, "_delim": spec.delimiter, "_baseline": baseline}
            for i, item in enumerate(load_items(root, spec, limit))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


class CoreSampler(ContextSampler):
    """Few-shot examples of item ``idx`` = ``Random(seed + idx).sample(other items, k)``, the seed being lm-eval's
    ``fewshot_random_seed`` (the official per-item sampling; lm-eval's default sampler uses one shared RNG)."""

    def __init__(self, df=None, *, rnd: int | None = None, **kwargs) -> None:
        super().__init__(df, rnd=rnd, **kwargs)
        self.seed = DEFAULT_FEWSHOT_SEED if rnd is None else rnd

    def set_rnd(self, rnd: int | None):
        self.seed = DEFAULT_FEWSHOT_SEED if rnd is None else rnd
        return super().set_rnd(rnd)

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        docs = self.fewshot_docs()
        idx = eval_doc["_idx"]
        others = [i for i in range(len(docs)) if i != idx]
        # min(): with --limit at or below the shot count the official code would fail; use every other item instead
        return [docs[i] for i in random.Random(self.seed + idx).sample(others, min(n, len(others)))]


def doc_to_text(doc: dict) -> str | int:
    """Context (delimiter minus its trailing space); for schema tasks the gold index (lm-eval's multiple-input
    mode, where each option is its own context)."""
    if doc["_type"] == SCHEMA:
        return doc["gold"]
    if doc["_type"] == MC:
        return doc["query"] + doc["_delim"][:-1]
    return doc["context"].strip() + doc["_delim"][:-1]


def doc_to_choice(doc: dict) -> list[str]:
    if doc["_type"] == SCHEMA:
        return [option + doc["_delim"][:-1] for option in doc["context_options"]]
    return list(doc["choices"])


def doc_to_target(doc: dict) -> str | int:
    if doc["_type"] == MC:
        return doc["gold"]
    if doc["_type"] == SCHEMA:
        return doc["continuation"]
    return " " + doc["continuation"]


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """``acc`` and ``acc_centered`` = (acc − b)/(1 − b); the mean of the latter is the task's centered accuracy.

    Options are ranked by the returned log-likelihoods: with ``--model parcae`` these are minus the mean loss over the
    tokens where options differ (the official rule); with stock ``--model hf`` they are summed log-probs."""
    if doc["_type"] == LM:
        acc = float(bool(results[0][1]))
    else:
        scores = [ll for ll, _ in results]
        acc = float(scores.index(max(scores)) == doc["gold"])
    baseline = doc["_baseline"]
    return {"acc": acc, "acc_centered": (acc - baseline) / (1.0 - baseline)}
