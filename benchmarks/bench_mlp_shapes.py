"""Our ReLU^2 MLP against the SwiGLU MLP of the unrolled Llama, alone, at the released widths: does the MLP's shape cost
time where the FLOPs are equal?

``bench_released_shapes.py`` compares with a Llama whose SwiGLU width (8d/3, rounded to 64) gives its three matrices
the parameters and FLOPs of our two (d x 4d, 4d x d). Equal FLOPs need not mean equal time: the BLAS picks its kernels
by shape. This benchmark times one decode step's MLP (``(batch, 1, d)`` in, ``ParcaeMLP`` vs transformers'
``LlamaMLP``) over 16 instances of each, each with its own weights, so that every call reads its weights from memory
as a step through the model does (a single instance would sit in the cache). Calls alternate between the two
kinds, 60 rounds; the median per MLP call is reported, and the share of the time in each matmul and in the
activation (same weights, ops called one by one).

    python benchmarks/bench_mlp_shapes.py                 # results/mlp_shapes.json, about 1 minute
    python benchmarks/bench_mlp_shapes.py --batches 8 --dtypes fp32 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from bench_released_shapes import (
    DTYPES, LoadLog, add_shared_arguments, machine_description, machine_line, save_and_show,
)
from released_models import llama_intermediate_size
from modeling_parcae import load_preset
from modeling_parcae.modeling_parcae import ParcaeMLP


RESULTS = Path(__file__).resolve().parent / "results" / "mlp_shapes.json"
INSTANCES = 16


def median_us(times: list[float]) -> float:
    return 1e6 * statistics.median(times)


def bench_cell(hidden: int, width: int, llama_width: int, dtype: torch.dtype, batch: int, rounds: int) -> dict:
    ours = [ParcaeMLP(hidden, width, bias=False).to(dtype).eval() for _ in range(INSTANCES)]
    llama_config = LlamaConfig(hidden_size=hidden, intermediate_size=llama_width, hidden_act="silu")
    llama = [LlamaMLP(llama_config).to(dtype).eval() for _ in range(INSTANCES)]
    x = torch.randn(batch, 1, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = {"ours": [], "llama": []}
    parts = {name: [] for name in ("ours_up", "ours_activation", "ours_down",
                                   "llama_gate", "llama_up", "llama_activation", "llama_down")}
    clock = time.perf_counter
    with torch.inference_mode():
        for round_index in range(rounds + 1):  # round 0 warms up
            for kind in (("ours", "llama") if round_index % 2 else ("llama", "ours")):
                mlps = ours if kind == "ours" else llama
                start = clock()
                for mlp in mlps:
                    mlp(x)
                if round_index:
                    whole[kind].append((clock() - start) / INSTANCES)
            if not round_index:
                continue
            for mlp in ours:  # the same work as ParcaeMLP.forward without a graph, op by op
                t0 = clock(); hidden_states = mlp.up_proj(x)
                t1 = clock(); hidden_states = F.relu_(hidden_states).square_().mul_(0.5)
                t2 = clock(); mlp.down_proj(hidden_states)
                t3 = clock()
                for name, seconds in (("ours_up", t1 - t0), ("ours_activation", t2 - t1), ("ours_down", t3 - t2)):
                    parts[name].append(seconds)
            for mlp in llama:  # LlamaMLP.forward op by op
                t0 = clock(); gate = mlp.gate_proj(x)
                t1 = clock(); up = mlp.up_proj(x)
                t2 = clock(); hidden_states = mlp.act_fn(gate) * up
                t3 = clock(); mlp.down_proj(hidden_states)
                t4 = clock()
                for name, seconds in (("llama_gate", t1 - t0), ("llama_up", t2 - t1),
                                      ("llama_activation", t3 - t2), ("llama_down", t4 - t3)):
                    parts[name].append(seconds)
    medians = {kind: median_us(times) for kind, times in whole.items()}
    return dict(median_us=medians, ours_over_llama=medians["ours"] / medians["llama"],
                ours_over_llama_paired=statistics.median(a / b for a, b in zip(whole["ours"], whole["llama"])),
                parts_median_us={name: median_us(times) for name, times in parts.items()})


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = load_preset(args.preset)
    hidden, width = config.hidden_size, config.intermediate_size
    llama_width = llama_intermediate_size(hidden)
    load, started, results = LoadLog(), time.perf_counter(), []
    for dtype_name in args.dtypes:
        for batch in args.batches:
            load.sample()
            cell = bench_cell(hidden, width, llama_width, DTYPES[dtype_name], batch, args.rounds)
            results.append(dict(dtype=dtype_name, batch=batch, **cell))
            print(f"  {dtype_name} B={batch}: ours {cell['median_us']['ours']:.0f} us, llama "
                  f"{cell['median_us']['llama']:.0f} us, ours/llama {cell['ours_over_llama']:.3f} "
                  f"(paired {cell['ours_over_llama_paired']:.3f})", flush=True)
    load.sample()
    return dict(benchmark="mlp_shapes", machine=machine_description(args.threads), load=load.summary(args.threads),
                wall_seconds=time.perf_counter() - started,
                settings=dict(preset=args.preset, hidden=hidden, ours_width=width, llama_width=llama_width,
                              instances=INSTANCES, rounds=args.rounds, dtypes=args.dtypes, batches=args.batches),
                results=results)


def print_table(report: dict) -> None:
    print("\n| dtype | B | ours us | llama us | ours/llama (paired) | ours up / act / down "
          "| llama gate / up / act / down |")
    print("|---|---|---|---|---|---|---|")
    for row in report["results"]:
        part = {name: round(value) for name, value in row["parts_median_us"].items()}
        print(f"| {row['dtype']} | {row['batch']} | {row['median_us']['ours']:.0f} | {row['median_us']['llama']:.0f} | "
              f"{row['ours_over_llama']:.3f} ({row['ours_over_llama_paired']:.3f}) | "
              f"{part['ours_up']} / {part['ours_activation']} / {part['ours_down']} | "
              f"{part['llama_gate']} / {part['llama_up']} / {part['llama_activation']} / {part['llama_down']} |")
    print(machine_line(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="parcae-140m")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (each calls every instance of both kinds)")
    add_shared_arguments(parser, RESULTS)
    args = parser.parse_args()
    return save_and_show(run(args), args.output, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
