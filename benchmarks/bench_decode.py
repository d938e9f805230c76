"""Decode speed with and without the loop-aware KV cache, at a 512-token context, across loop counts.

Prints a table, writes ``benchmarks/results/decode.json`` and checks the two claims of the generation docs: cached
decoding is >= 5x faster per token than recomputing the context at 8 loops, and its cost per token grows linearly
with ``num_loops`` (a least-squares line through the per-token times explains them, R^2 >= 0.98).

    python benchmarks/bench_decode.py [--context 512] [--new-tokens 16]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM


LOOPS = (1, 4, 8, 16)


def small_model() -> ParcaeForCausalLM:
    """A released-style model at toy width (d=256, 2/2/2 blocks), random weights."""
    config = ParcaeConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_attention_heads=2,
                          num_prelude_layers=2, num_core_layers=2, num_coda_layers=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return ParcaeForCausalLM(config).eval()


def seconds_per_token(model, prompt, loops: int, steps: int, use_cache: bool) -> float:
    """Median wall time of one decode step: a 1-token forward against the cache, or a full-context recompute.

    These are exactly the forward calls ``generate`` makes per new token with ``use_cache=True`` / ``False``; the
    median over ``steps`` calls keeps the figure stable on a shared machine.
    """
    times = []
    with torch.no_grad():
        if use_cache:
            cache = model(prompt, num_loops=loops, use_cache=True).cache
            token = prompt[:, -1:]
            for _ in range(steps):
                start = time.perf_counter()
                model(token, cache=cache, num_loops=loops, use_cache=True, logits_to_keep=1)
                times.append(time.perf_counter() - start)
        else:
            for _ in range(steps):
                start = time.perf_counter()
                model(prompt, num_loops=loops, use_cache=False, logits_to_keep=1)
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def linear_fit_r2(xs, ys) -> float:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    residual = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    total = sum((y - mean_y) ** 2 for y in ys)
    return 1 - residual / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per setting")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = parser.parse_args()

    model = small_model()
    prompt = torch.randint(3, 4096, (1, args.context), generator=torch.Generator().manual_seed(0))
    rows = []
    for loops in LOOPS:
        cached = seconds_per_token(model, prompt, loops, args.new_tokens, use_cache=True)
        uncached = seconds_per_token(model, prompt, loops, max(3, args.new_tokens // 4), use_cache=False)
        rows.append(dict(num_loops=loops, cached_tokens_per_s=1 / cached, uncached_tokens_per_s=1 / uncached,
                         speedup=uncached / cached, cached_ms_per_token=1000 * cached))
        print(f"num_loops={loops:>2}  cached {1 / cached:8.1f} tok/s   uncached {1 / uncached:7.2f} tok/s   "
              f"speedup {uncached / cached:6.1f}x", flush=True)

    r2 = linear_fit_r2([r["num_loops"] for r in rows], [r["cached_ms_per_token"] for r in rows])
    at_eight = next(r for r in rows if r["num_loops"] == 8)["speedup"]
    result = dict(
        machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        torch=torch.__version__, context=args.context, new_tokens=args.new_tokens,
        model="d=256, prelude/core/coda 2/2/2, vocab 4096, fp32, random weights", rows=rows,
        cached_cost_linear_in_loops_r2=r2, speedup_at_8_loops=at_eight,
        checks=dict(speedup_at_8_ge_5=at_eight >= 5, cost_linear_in_loops=r2 >= 0.98),
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| num_loops | cached tok/s | uncached tok/s | speedup |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_loops']} | {r['cached_tokens_per_s']:.1f} | {r['uncached_tokens_per_s']:.2f} | "
              f"{r['speedup']:.1f}x |")
    print(f"\ncached ms/token vs num_loops: linear fit R^2 = {r2:.4f}; speedup at 8 loops = {at_eight:.1f}x")
    print(f"checks: {result['checks']}   -> {args.output}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
