"""Bounded KV memory (``ParcaeSharedLoopCache``, ``--kv-mode shared``) against the exact per-loop cache at 4, 8 and
16 loops: cache memory, held-out loss read through the cache, greedy agreement, and CORE on the golden model.

* memory: ``cache_memory_bytes(cache)`` after a 12-token prompt and 32 generated tokens (batch 1);
* held-out loss: each ``heldout.txt`` paragraph (first 64 tokens) is prefilled for 8 tokens and then fed one token
  at a time through the cache, as generation reads it (with the exact cache this equals the uncached loss);
* greedy agreement: 8 prompts, 32 greedy tokens, fraction equal to the exact cache's;
* CORE (golden model): ``parcae eval``'s scorer with the options' shared few-shot prefix stored in each cache.

Writes ``benchmarks/results/kv.json``.

    python benchmarks/bench_kv.py [--core-limit 20] [--core-tasks core]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO.parent / "shared" / "eval_bundle"
LOOP_COUNTS = (4, 8, 16)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adaptive import heldout_rows, load  # noqa: E402  (the sibling benchmark's model and data loading)
from modeling_parcae.transformers_compat import CACHE_NAME, cache_of  # noqa: E402


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other processes; torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads")


def make_cache(model, mode: str, loops: int):
    from transformers import DynamicCache

    from modeling_parcae import ParcaeSharedLoopCache

    return ParcaeSharedLoopCache() if mode == "shared" else DynamicCache()


@torch.inference_mode()
def stepwise_heldout(model, tokenizer, rows: list[list[int]], mode: str, loops: int, prefill: int = 8,
                     batch_size: int = 32) -> dict:
    """Loss/bpb of every token after the first ``prefill``, predicted through the cache one token at a time. Rows are
    right-padded: real tokens never follow padding, so they never attend to it and need no mask."""
    from modeling_parcae.scoring import loss_and_bpb, next_token_totals, pad_id_of, pad_right, token_byte_lengths

    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    totals = torch.zeros(3, dtype=torch.float64)
    for b in range(0, len(rows), batch_size):
        ids, mask = pad_right(rows[b: b + batch_size], pad_id_of(tokenizer))
        cache = make_cache(model, mode, loops)
        logits = [model(ids[:, :prefill], num_loops=loops, cache=cache, use_cache=True).logits[:, -1:]]
        for t in range(prefill, ids.shape[1] - 1):
            logits.append(model(ids[:, t: t + 1], num_loops=loops, cache=cache, use_cache=True).logits)
        totals += next_token_totals(torch.cat(logits, dim=1), ids[:, prefill:], mask[:, prefill:], byte_lengths)
    loss, bpb = loss_and_bpb(totals)
    return {"loss": loss, "bpb": bpb}


@torch.inference_mode()
def generate(model, prompts: torch.Tensor, mode: str, loops: int, new_tokens: int = 32):
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), num_loops=loops,
                         **{CACHE_NAME: make_cache(model, mode, loops)}, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    from modeling_parcae.cache_parcae import cache_memory_bytes

    return out.sequences[:, prompts.shape[1]:], cache_memory_bytes(cache_of(out))


def core(model, tokenizer, tasks, mode: str, loops: int) -> float:
    """CORE (v1 baselines, seed 1234) with each item's shared prefix stored in a ``mode`` cache."""
    from modeling_parcae.eval.aggregate import centered
    from modeling_parcae.eval.bundle import load_baselines
    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.runner import run_lm_eval
    from modeling_parcae.eval.specs import CORE_LABELS

    lm = ParcaeLM(model, tokenizer=tokenizer, num_loops=loops, batch_size=32)
    lm.prefix_cache = lambda: make_cache(model, mode, loops)
    results = run_lm_eval(lm, tasks, seed=1234)
    baselines = load_baselines(BUNDLE, "v1")
    labels = [label for label in results if label in CORE_LABELS]
    return 100 * sum(centered(results[label]["acc"], baselines[label]) for label in labels) / len(labels)



def measure(name: str, model, tokenizer, core_tasks) -> dict:
    rows = [r[:64] for r in heldout_rows(tokenizer, 200, 63) if len(r) > 9]
    prompts = torch.tensor([r[:12] for r in rows if len(r) >= 12][:8])
    result = {}
    for loops in LOOP_COUNTS:
        row = {}
        sequences = {}
        for mode in ("exact", "shared"):
            sequences[mode], _ = generate(model, prompts, mode, loops)
            _, memory = generate(model, prompts[:1], mode, loops)
            row[mode] = {"cache_MiB_batch1_44_tokens": memory / 2**20,
                         "heldout": stepwise_heldout(model, tokenizer, rows, mode, loops)}
            if core_tasks is not None:
                row[mode]["core"] = core(model, tokenizer, core_tasks, mode, loops)
        row["shared"]["greedy_agreement_with_exact"] = float((sequences["shared"] == sequences["exact"]).float().mean())
        row["memory_ratio_shared_vs_exact"] = (row["shared"]["cache_MiB_batch1_44_tokens"]
                                               / row["exact"]["cache_MiB_batch1_44_tokens"])
        row["heldout_loss_increase"] = row["shared"]["heldout"]["loss"] / row["exact"]["heldout"]["loss"] - 1
        result[str(loops)] = row
        print(name, loops, json.dumps(row), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,golden")
    parser.add_argument("--core-limit", type=int, default=20)
    parser.add_argument("--core-tasks", default="core", help="CORE tasks for the golden model ('' to skip)")
    parser.add_argument("--workdir", default="/tmp/parcae-bench")
    args = parser.parse_args()
    report = {"machine": machine(), "loop_counts": list(LOOP_COUNTS),
              "rule": "shared: one slot per core block for all loops; later tokens read the last loop's keys/values",
              "models": {}}
    for name in args.models.split(","):
        model, tokenizer = load(name, Path(args.workdir))
        core_tasks = None
        if name == "golden" and args.core_tasks:
            from modeling_parcae.eval.bundle import split_available
            from modeling_parcae.eval.runner import build_tasks
            from modeling_parcae.eval.specs import resolve_task_names

            labels = split_available(BUNDLE, resolve_task_names(args.core_tasks.split(",")))[0]
            core_tasks = build_tasks(labels, BUNDLE, args.core_limit)
            report["core"] = {"tasks": labels, "limit": args.core_limit, "seed": 1234, "baselines": "v1"}
        report["models"][name] = measure(name, model, tokenizer, core_tasks)
    out = REPO / "benchmarks" / "results" / "kv.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
