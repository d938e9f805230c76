"""Reference CORE scorer: a second, lm-eval-free implementation of the official procedure (nanochat / Parcae
``core_eval``): Jinja-rendered prompts, BOS-prepended tokens, common prefix/suffix spans, official left-crop, one
forward per item with all its options, lowest mean loss / greedy exact match. Tests use it to prove the lm-eval path
exact; it is also handy for quick checks without lm-eval."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from jinja2 import Template
from tqdm import tqdm

from modeling_parcae.eval.modelio import forward_logits, max_length
from modeling_parcae.eval.procedure import encode_with_bos, load_items
from modeling_parcae.eval.specs import LM, MC, SCHEMA, TASKS, TaskSpec
from modeling_parcae.scoring import pad_id_of, pad_right

_MC = Template("""
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip())

_SCHEMA = Template("""
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip())

_LM = Template("""
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}
""".strip())


def fewshot_examples(items: list[dict], idx: int, k: int, seed: int) -> list[dict]:
    if k <= 0:
        return []
    others = [i for i in range(len(items)) if i != idx]
    # min(): with --limit at or below the shot count the official code would fail; use every other item instead
    return [items[i] for i in random.Random(seed + idx).sample(others, min(k, len(others)))]


def render_prompts(spec: TaskSpec, items: list[dict], idx: int, seed: int) -> list[str]:
    """The item's prompt strings: one per option (MC, schema) or [without, with] continuation (LM)."""
    item = items[idx]
    ctx = {"fewshot_examples": fewshot_examples(items, idx, spec.num_fewshot, seed),
           "continuation_delimiter": spec.delimiter, "item": item}
    if spec.task_type == MC:
        return [_MC.render(choice=choice, **ctx) for choice in item["choices"]]
    if spec.task_type == SCHEMA:
        return [_SCHEMA.render(context=option, **ctx) for option in item["context_options"]]
    return [_LM.render(include_continuation=flag, **ctx).strip() for flag in (False, True)]


def _common_length(rows: list[list[int]], from_left: bool) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        pos = i if from_left else -1 - i
        if any(r[pos] != rows[0][pos] for r in rows):
            return i
    return n


def token_spans(spec: TaskSpec, tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[int], list[int]]:
    """Token rows and scored spans [start, end) before cropping, per the task type."""
    rows = encode_with_bos(tokenizer, prompts)
    if spec.task_type == MC:
        start = _common_length(rows, from_left=True)
        return rows, [start] * len(rows), [len(r) for r in rows]
    if spec.task_type == SCHEMA:
        suffix = _common_length(rows, from_left=False)
        return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]
    without, with_ = rows
    if with_[: len(without)] != without or len(without) >= len(with_):
        raise ValueError("language-modelling prompt without continuation is not a token prefix of the full prompt")
    return [with_], [len(without)], [len(with_)]


def crop_left(rows, starts, ends, limit: int):
    """Keep the last ``limit`` tokens of each row and shift its span (official behaviour). A span cropped down to the
    first token (where the official code asserts or scores nothing) is clamped to start at position 1."""
    out, cropped = [], []
    for r, s, e in zip(rows, starts, ends):
        n = max(0, len(r) - limit)
        out.append((r[n:], max(s - n, 1), e - n))
        cropped.append(n)
    rows, starts, ends = (list(x) for x in zip(*out))
    return rows, starts, ends, cropped


def score_item(model, tokenizer, spec: TaskSpec, prompts: list[str], gold: int | None, num_loops: int | None,
               limit: int, device) -> tuple[bool, dict]:
    rows, starts, ends = token_spans(spec, tokenizer, prompts)
    rows, starts, ends, cropped = crop_left(rows, starts, ends, limit)
    ids, mask = pad_right(rows, pad_id_of(tokenizer), device)
    logits = forward_logits(model, ids, mask, num_loops)
    targets = torch.roll(ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(ids.shape)
    if spec.task_type == LM:
        s, e = starts[0], ends[0]
        matches = logits[0, s - 1: e - 1].argmax(-1) == ids[0, s:e]
        info = {"n_match": int(matches.sum()), "n_cont": e - s, "mean_loss": losses[0, s - 1: e - 1].mean().item(),
                "prompt_tokens": len(rows[0]), "cropped": cropped[0]}
        return bool(matches.all()), info
    mean_losses = [losses[i, s - 1: e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    info = {"mean_loss": mean_losses, "n_scored": [e - s for s, e in zip(starts, ends)],
            "prompt_tokens": [len(r) for r in rows], "cropped": cropped}
    return mean_losses.index(min(mean_losses)) == gold, info


def score_task(model, tokenizer, bundle: str | Path, label: str, *, seed: int = 1234, limit: int | None = None,
               num_loops: int | None = None, max_len: int | None = None, device="cpu",
               progress: bool = False) -> dict:
    """Official accuracy of one task: ``{"acc", "correct": [...], "scores": [...]}`` (scores as in the golden
    ``reference.json``)."""
    spec = TASKS[label]
    items = load_items(bundle, spec, limit)
    max_len = max_len or max_length(model)
    correct, scores = [], []
    for idx in tqdm(range(len(items)), desc=f"reference {label}", disable=not progress):
        ok, info = score_item(model, tokenizer, spec, render_prompts(spec, items, idx, seed), items[idx].get("gold"),
                              num_loops, max_len, device)
        correct.append(ok)
        scores.append(info)
    return {"acc": sum(correct) / len(correct), "correct": correct, "scores": scores}
