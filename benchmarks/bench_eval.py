"""Evaluation throughput: the lm-eval path (``--model parcae``, batched) vs the reference scorer (one forward per item,
like the official evaluator) on a random tiny Parcae model. Writes ``benchmarks/results/eval.json``.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py [--bundle ../shared/eval_bundle]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TASKS = ["arc_easy", "piqa", "commonsense_qa", "copa", "winograd", "winogrande", "lambada_openai", "jeopardy",
         "boolq", "bigbench_operators"]


def tiny_model():
    from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer

    torch.manual_seed(0)
    config = ParcaeConfig(vocab_size=288, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                          num_prelude_layers=2, num_core_layers=2, num_coda_layers=2, mean_recurrence=4,
                          mean_backprop_depth=4, max_position_embeddings=512)
    tokenizer = load_official_tokenizer(REPO / "tests" / "fixtures" / "golden" / "tokenizer", 512)
    return ParcaeForCausalLM(config).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO.parent / "shared" / "eval_bundle"))
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--num-loops", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "eval.json"))
    args = parser.parse_args()

    from modeling_parcae.eval.lm import ParcaeLM
    from modeling_parcae.eval.reference import score_task
    from modeling_parcae.eval.runner import build_tasks, run_lm_eval

    model, tokenizer = tiny_model()
    t0 = time.perf_counter()
    tasks = build_tasks(TASKS, args.bundle, args.limit)
    build_s = time.perf_counter() - t0
    n_requests = 0
    for task in tasks.values():
        task.build_all_requests(limit=None)
        n_requests += len(task.instances)

    t0 = time.perf_counter()
    ref_acc = {label: score_task(model, tokenizer, args.bundle, label, limit=args.limit, num_loops=args.num_loops)["acc"]
               for label in TASKS}
    ref_s = time.perf_counter() - t0

    runs = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        lm = ParcaeLM(model, tokenizer=tokenizer, num_loops=args.num_loops, batch_size=batch_size)
        t0 = time.perf_counter()
        res = run_lm_eval(lm, tasks, seed=1234)
        seconds = time.perf_counter() - t0
        runs[str(batch_size)] = {"seconds": seconds, "requests_per_s": n_requests / seconds,
                                 "time_vs_reference": seconds / ref_s,
                                 "same_accuracy_as_reference": all(res[k]["acc"] == ref_acc[k] for k in TASKS)}
    best = min(runs.values(), key=lambda r: r["seconds"])
    report = {
        "what": "CORE scoring throughput, random tiny Parcae (d=64, 2/2/2 layers, 512 ctx), CPU float32",
        "tasks": TASKS, "limit": args.limit, "num_loops": args.num_loops, "requests": n_requests,
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "task_build_seconds": build_s,
        "reference": {"seconds": ref_s, "requests_per_s": n_requests / ref_s},
        "lm_eval_by_batch_size": runs,
        "lm_eval_within_1_5x_of_reference": best["time_vs_reference"] <= 1.5,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
