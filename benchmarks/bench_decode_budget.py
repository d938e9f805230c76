"""What a cached decode step of ours spends on the pieces an unrolled Llama does not have, at the released shapes.

``bench_released_shapes.py`` compares a Parcae decode step with a transformers Llama that executes as many blocks.
Parcae's block does more than Llama's: a weightless qk-norm on queries and keys, value embeddings mixed into the values
through a per-head gate, and around the loop the diagonal injection (``e B^T``, a d x d matmul, and the decay) and
the state readout (another d x d matmul). This benchmark switches each piece off in turn on the same model (random
weights; the numbers change, the work per step is what is measured) and times the step again:

* ``ours``: the model as it is;
* ``-qk_norm``: every attention's ``qk_norm = False``;
* ``-value_embeddings``: no table lookups, no gate (every block's ``ve_gate`` and table key removed);
* ``-injection_readout``: the additive injection ``u = h + e`` and an identity readout;
* ``bare``: all three off: the Llama-shaped work that is left (interleaved RoPE and the input checks stay);
* ``llama``: the unrolled Llama of ``bench_released_shapes.py``.

Steps are interleaved (all six, order rotated per step) and each piece's cost is the median of its back-to-back
differences ``ours - without`` as a share of the Llama step. Decode only, batch 1 by default: there a step is a
few dozen small kernels per block, and these pieces' kernel launches weigh most.

    python benchmarks/bench_decode_budget.py                  # results/decode_budget.json, about 3.5 minutes
    python benchmarks/bench_decode_budget.py --presets parcae-140m --dtypes bf16 --loops 1 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bench_released_shapes import (
    DTYPES, LoadLog, Ours, UnrolledLlama, add_shared_arguments, machine_description, machine_line, save_and_show,
    timed_call,
)
from released_models import build_llama, build_parcae, executed_depth
from modeling_parcae.modeling_parcae import ParcaeAdditiveInjection


RESULTS = Path(__file__).resolve().parent / "results" / "decode_budget.json"
PIECES = ("qk_norm", "value_embeddings", "injection_readout")
VARIANTS = ("ours", *(f"-{piece}" for piece in PIECES), "bare", "llama")


def _pieces_removed(variant: str) -> tuple[str, ...]:
    if variant == "bare":
        return PIECES
    return (variant[1:],) if variant.startswith("-") else ()


@contextmanager
def without(model, pieces: tuple[str, ...]) -> Iterator[None]:
    """``model`` with ``pieces`` switched off, restored on exit (attribute swaps on the live model)."""
    base, saved = model.model, []

    def swap(owner, name: str, value) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    if "qk_norm" in pieces:
        for block in (*base.prelude, *base.core, *base.coda):
            swap(block.self_attn, "qk_norm", False)
    if "value_embeddings" in pieces:
        for block in (*base.prelude, *base.core, *base.coda):
            swap(block, "spec", dataclasses.replace(block.spec, value_embedding_key=None))
            swap(block.self_attn, "ve_gate", None)
    if "injection_readout" in pieces:
        swap(base, "injection", ParcaeAdditiveInjection(model.config))
        swap(base, "state_readout", nn.Identity())
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def bench_cell(ours: Ours, llama: UnrolledLlama, vocab: int, batch: int, loops: int, steps: int,
               load: LoadLog) -> dict:
    load.sample()
    first = torch.randint(3, vocab, (batch, 1), generator=torch.Generator().manual_seed(1))
    contender = {variant: llama if variant == "llama" else ours for variant in VARIANTS}
    caches = {variant: contender[variant].new_cache(batch, loops) for variant in VARIANTS}
    tokens = dict.fromkeys(VARIANTS, first)
    times = {variant: [] for variant in VARIANTS}
    with torch.no_grad():
        for step in range(steps + 1):  # step 0 warms up
            shift = step % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                with without(ours.model, _pieces_removed(variant)):
                    tokens[variant], (wall, _) = timed_call(
                        lambda: contender[variant].decode_step(tokens[variant], caches[variant], loops))
                if step:
                    times[variant].append(wall)
    median = {variant: statistics.median(times[variant]) for variant in VARIANTS}
    llama_step = median["llama"]
    return dict(
        median_ms={variant: 1e3 * value for variant, value in median.items()},
        ours_over_llama=median["ours"] / llama_step,
        bare_over_llama=median["bare"] / llama_step,
        share_of_llama_step={
            name: statistics.median(a - b for a, b in zip(times["ours"], times[variant])) / llama_step
            for name, variant in [*((piece, f"-{piece}") for piece in PIECES), ("all three", "bare")]
        },
    )


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load, started, results = LoadLog(), time.perf_counter(), []
    for preset in args.presets:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            model = build_parcae(preset, dtype)
            config = model.config
            ours = Ours(model)
            llama = UnrolledLlama(build_llama(config, executed_depth(config, max(args.loops)), dtype), config)
            for batch in args.batches:
                for loops in args.loops:
                    cell = bench_cell(ours, llama, config.vocab_size, batch, loops, args.steps, load)
                    results.append(dict(preset=preset, dtype=dtype_name, batch=batch, loops=loops, **cell))
                    print(f"  {preset} {dtype_name} B={batch} loops={loops}: ours/llama "
                          f"{cell['ours_over_llama']:.3f}, bare/llama {cell['bare_over_llama']:.3f}", flush=True)
    load.sample()
    return dict(benchmark="decode_budget", machine=machine_description(args.threads), load=load.summary(args.threads),
                wall_seconds=time.perf_counter() - started,
                settings=dict(presets=args.presets, dtypes=args.dtypes, loops=args.loops, batches=args.batches,
                              steps=args.steps, variants=list(VARIANTS)),
                results=results)


def print_table(report: dict) -> None:
    print("\n| preset | dtype | B | loops | ours/llama | " + " | ".join(f"{p} % of llama step" for p in PIECES)
          + " | all three % | bare/llama |")
    print("|" + "---|" * (7 + len(PIECES)))
    for row in report["results"]:
        shares = row["share_of_llama_step"]
        print(f"| {row['preset']} | {row['dtype']} | {row['batch']} | {row['loops']} | {row['ours_over_llama']:.3f} | "
              + " | ".join(f"{100 * shares[p]:.1f}" for p in PIECES)
              + f" | {100 * shares['all three']:.1f} | {row['bare_over_llama']:.3f} |")
    print(machine_line(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["parcae-140m", "parcae-370m"])
    parser.add_argument("--loops", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant and cell (median reported)")
    add_shared_arguments(parser, RESULTS)
    args = parser.parse_args()
    return save_and_show(run(args), args.output, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
