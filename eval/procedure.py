"""Data side of the official CORE procedure shared by the lm-eval tasks and the reference scorer: which items are
evaluated (``Random(1337)`` shuffle, then the official ``max_per_task`` truncation) and how they are tokenized."""

from __future__ import annotations

import json
import random
from pathlib import Path

from modeling_parcae.eval.specs import TaskSpec

SHUFFLE_SEED = 1337


def load_items(bundle: str | Path, spec: TaskSpec, limit: int | None = None) -> list[dict]:
    """The task's items in evaluation order. ``limit`` follows the official ``max_per_task``: shuffle first, keep the
    first ``limit`` items, and few-shot examples are later drawn from those items only."""
    path = Path(bundle) / "eval_data" / spec.dataset_uri
    if not path.is_file():
        raise FileNotFoundError(_missing_data_message(Path(bundle), spec))
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno})") \
                        from None
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items if check_limit(limit) is None else items[:limit]


def _missing_data_message(bundle: Path, spec: TaskSpec) -> str:
    """Which file is missing, every task of the bundle that cannot run for the same reason, and what can run."""
    from modeling_parcae.eval.bundle import split_available
    from modeling_parcae.eval.specs import TASKS

    present, missing = split_available(bundle, list(TASKS))
    return (f"task {spec.task_name}: the eval bundle {bundle} has no eval_data/{spec.dataset_uri}. This bundle lacks "
            f"the data of {len(missing)} of {len(TASKS)} tasks ({', '.join(TASKS[m].task_name for m in missing)}), so "
            "the groups core / core_extended cannot run from it in lm-eval; name the tasks it has instead, e.g. "
            f"--tasks {','.join(TASKS[p].task_name for p in present)} (`parcae eval` skips missing tasks by itself)")


def check_limit(limit: int | None) -> int | None:
    """``--limit`` has one meaning everywhere: absent keeps everything, N >= 1 keeps the first N (task items after the
    official shuffle, bpb documents in file order). 0 and negative values are refused rather than read as "no limit"
    (the official ``max_per_task=-1``) or as "nothing"."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, or absent for no limit; got {limit!r}")
    return limit


def bos_token_id(tokenizer) -> int:
    """The id the official evaluator prepends: the tokenizer's BOS, else id 1 (what it falls back to)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1


def encode_with_bos(tokenizer, texts: list[str]) -> list[list[int]]:
    """Tokenize without special tokens, then prepend BOS unless already first (official ``encode_with_bos``)."""
    bos = bos_token_id(tokenizer)
    out = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        out.append(list(ids) if ids and ids[0] == bos else [bos, *ids])
    return out
