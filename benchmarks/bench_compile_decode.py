"""Eager decode with the dynamic cache vs ``torch.compile``d decode with the pre-allocated static cache.

Per (loops, batch): prefill a 64-token prompt, then time single-token decode steps, the forward ``generate`` runs
per new token. Eager and compiled steps are interleaved round by round (after the compiled step's warm-up
compilation, which is reported separately) and the median tokens/s of each is kept, so the ratio comes from one
run on one machine. Prints a table and writes ``benchmarks/results/compile_decode.json``.

    python benchmarks/bench_compile_decode.py [--loops 1 4 8] [--batch 1 8] [--rounds 5] [--steps 8]
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
from transformers import DynamicCache, StaticCache


PROMPT = 64
RESULTS = Path(__file__).resolve().parent / "results" / "compile_decode.json"


def small_model() -> ParcaeForCausalLM:
    """A released-style model at toy width (d=256, 2/2/2 blocks), random weights (as bench_decode.py)."""
    config = ParcaeConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_attention_heads=2,
                          num_prelude_layers=2, num_core_layers=2, num_coda_layers=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return ParcaeForCausalLM(config).eval()


def prefill(model, cache, prompt, loops):
    """Fill ``cache`` with the prompt; return the inputs of the first decode step."""
    logits = model(prompt, cache=cache, num_loops=loops, use_cache=True).logits
    return logits[:, -1:].argmax(-1), prompt.shape[1]


def decode_rate(step, model, cache_factory, prompt, loops, steps) -> float:
    """Tokens/s (batch x steps / seconds) of ``steps`` greedy decode steps after a fresh prefill."""
    cache = cache_factory()
    cache.reset()
    token, position = prefill(model, cache, prompt, loops)
    start = time.perf_counter()
    for offset in range(steps):
        positions = torch.full((prompt.shape[0], 1), position + offset)
        logits = step(input_ids=token, position_ids=positions, cache=cache, num_loops=loops,
                      use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    return prompt.shape[0] * steps / (time.perf_counter() - start)


def measure(model, loops: int, batch: int, rounds: int, steps: int) -> dict:
    prompt = torch.randint(3, model.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    max_len = PROMPT + steps
    compiled = torch.compile(model.forward, fullgraph=True)
    dynamic = DynamicCache
    # one static cache, reset between runs: the compiled step keeps its tensors' addresses (as generate reuses it)
    static_cache = StaticCache(config=model.config, max_cache_len=max_len)
    static = lambda: static_cache  # noqa: E731
    start = time.perf_counter()
    decode_rate(compiled, model, static, prompt, loops, 2)  # compiles (and recompiles once for the cache update)
    compile_seconds = time.perf_counter() - start
    eager_rates, compiled_rates = [], []
    for _ in range(rounds):
        eager_rates.append(decode_rate(model.forward, model, dynamic, prompt, loops, steps))
        compiled_rates.append(decode_rate(compiled, model, static, prompt, loops, steps))
    eager, fast = statistics.median(eager_rates), statistics.median(compiled_rates)
    return {"loops": loops, "batch": batch, "eager_dynamic_tok_s": round(eager, 2),
            "compiled_static_tok_s": round(fast, 2), "speedup": round(fast / eager, 3),
            "compile_seconds": round(compile_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = small_model()
    rows, load_at_start = [], round(os.getloadavg()[0], 2)  # the ratios are interleaved; the load says how noisy
    with torch.no_grad():
        for batch in args.batch:
            for loops in args.loops:
                torch._dynamo.reset()
                row = measure(model, loops, batch, args.rounds, args.steps)
                rows.append(row)
                print(f"loops {loops:2d} batch {batch}: eager dynamic {row['eager_dynamic_tok_s']:8.1f} tok/s, "
                      f"compiled static {row['compiled_static_tok_s']:8.1f} tok/s, x{row['speedup']:.2f} "
                      f"(compile {row['compile_seconds']} s)", flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}",
        "load_average_1min": {"start": load_at_start, "end": round(os.getloadavg()[0], 2)},
        "torch": torch.__version__, "model": "d=256, prelude/core/coda 2/2/2, vocab 4096, float32, sdpa",
        "prompt_tokens": PROMPT, "decode_steps": args.steps, "rounds": args.rounds, "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
