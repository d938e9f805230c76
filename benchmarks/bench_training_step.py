"""One training step at the parcae-140m shape: ours vs the official model class on the same weights and depths.

A step is forward + cross-entropy + backward (no optimizer: both sides would run the same optimizer code) on
B=2 x T=1024 tokens in fp32, 8 loops of which the last 4 carry gradients: ``num_loops=(4, 4)`` for ours,
``num_steps_pair=[4, 4]`` for the official ``Parcae.forward`` (its per-sequence sampler is bypassed by the fixed pair).
The official class is imported from ``PARCAE_OFFICIAL_SRC`` and holds the same weight tensors (``released_models.py``);
without it only our step is timed and the comparison is reported as skipped.

Steps alternate between the two models (median reported), then one more step per model measures the peak resident
memory it adds (``peak_memory.py``): activations, gradients and logits.

``--compile`` adds two rows of ours compiled by inductor (``dynamic=False``, compiled in the warm-up step): the blocks
only (``compile_blocks``, head and loss eager) and the blocks plus the loss (``compile_loss`` too: what
``parcae train --compile`` runs), each on its own copy of the weights. Its JSON goes to
``results/training_step_compiled.json`` unless ``--output`` says otherwise.

    PARCAE_OFFICIAL_SRC=/tmp/official-parcae python benchmarks/bench_training_step.py  # results/training_step.json
    python benchmarks/bench_training_step.py --steps 1 --seq-len 256                  # a quick smoke run
    python benchmarks/bench_training_step.py --compile --steps 3     # results/training_step_compiled.json
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import peak_memory
from bench_released_shapes import (
    LoadLog, machine_description, ratios_over_others, save_report, timed_row, timed_call,
)
from released_models import build_official, build_parcae, import_official
from modeling_parcae.compilation import compile_blocks, compile_loss


RESULTS = Path(__file__).resolve().parent / "results" / "training_step.json"


def ours_step(model, batch: torch.Tensor, no_grad_loops: int, grad_loops: int) -> Callable[[], None]:
    def step() -> None:
        loss = model(batch[:, :-1], labels=batch[:, :-1], num_loops=(no_grad_loops, grad_loops)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def official_step(model, batch: torch.Tensor, no_grad_loops: int, grad_loops: int) -> Callable[[], None]:
    def step() -> None:
        # the official forward takes labels already shifted; ours shifts them itself: the same loss either way
        labels = F.pad(batch[:, 1:-1], (0, 1), value=-100)
        loss = model(batch[:, :-1], labels=labels, num_steps_pair=torch.tensor([no_grad_loops, grad_loops]))["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="parcae-140m")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--loops", type=int, default=8)
    parser.add_argument("--backprop", type=int, default=4, help="loops that carry gradients (the last ones)")
    parser.add_argument("--steps", type=int, default=11,
                        help="timed steps per model (median reported; 11 take about 6 minutes on 2 cores)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with compiled blocks, and with compiled blocks and loss (inductor)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.output = args.output or RESULTS.with_name("training_step_compiled.json" if args.compile else RESULTS.name)

    torch.set_num_threads(args.threads)
    memory_problem = peak_memory.enable()
    official_class, official_problem = import_official()
    if official_problem:
        print(f"official comparison skipped: {official_problem}", flush=True)
    load = LoadLog()
    started = time.perf_counter()

    ours = build_parcae(args.preset, torch.float32).train()
    no_grad_loops = args.loops - args.backprop
    batch = torch.randint(3, ours.config.vocab_size, (args.batch_size, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    steps = {"ours": ours_step(ours, batch, no_grad_loops, args.backprop)}
    if official_class is not None:
        official = build_official(official_class, ours).train()
        steps["official"] = official_step(official, batch, no_grad_loops, args.backprop)
    if args.compile:
        blocks = compile_blocks(copy.deepcopy(ours), dynamic=False)
        steps["ours, blocks compiled"] = ours_step(blocks, batch, no_grad_loops, args.backprop)
        both = compile_loss(compile_blocks(copy.deepcopy(ours), dynamic=False), dynamic=False)
        steps["ours, blocks + loss compiled"] = ours_step(both, batch, no_grad_loops, args.backprop)

    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in steps}
    for repeat in range(args.steps):
        load.sample()
        for name in list(steps)[repeat % len(steps):] + list(steps)[:repeat % len(steps)]:
            times[name].append(timed_call(steps[name])[1])
        print(f"  step {repeat + 1}/{args.steps}: " + ", ".join(f"{n} {t[-1][0]:.2f} s" for n, t in times.items()),
              flush=True)
    rows = {}
    for name, step in steps.items():
        peak = peak_memory.peak_bytes(step)
        rows[name] = timed_row(times[name], peak)
    load.sample()

    report = dict(
        benchmark="training_step", machine=machine_description(args.threads), load=load.summary(args.threads),
        wall_seconds=time.perf_counter() - started,
        settings=dict(preset=args.preset, dtype="fp32", batch_size=args.batch_size, seq_len=args.seq_len,
                      num_loops=args.loops, backprop_loops=args.backprop, timed_steps=args.steps,
                      step="forward + cross-entropy + backward, no optimizer"),
        official_skipped=official_problem, peak_memory_unavailable=memory_problem,
        peak_memory_definition="resident memory one extra untimed step adds (benchmarks/peak_memory.py)",
        models=rows,
    )
    if "official" in rows:
        ratios = ratios_over_others(rows)
        report["time_ours_over_official"] = ratios["ours_over_official"]
        report["time_ours_over_official_paired"] = ratios["ours_over_official_paired"]
        report["cpu_time_ours_over_official"] = ratios["ours_over_official_cpu"]
        if rows["ours"]["peak_mb"] is not None:
            report["memory_ours_over_official"] = rows["ours"]["peak_mb"] / rows["official"]["peak_mb"]
    if args.compile:
        # the compiled loss's effect: blocks + loss over blocks only, time and peak memory, measured in this run
        with_loss, without = rows["ours, blocks + loss compiled"], rows["ours, blocks compiled"]
        report["compiled_loss_over_eager_loss"] = dict(
            time=with_loss["median_s"] / without["median_s"],
            memory=with_loss["peak_mb"] / without["peak_mb"] if without["peak_mb"] else None)
        print(f"compiled loss / eager loss (blocks compiled in both): "
              f"{report['compiled_loss_over_eager_loss']}")
    save_report(report, args.output)

    for name, row in rows.items():
        peak = f"{row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else "?"
        print(f"{name:>28}: {row['median_s']:.2f} s/step, peak {peak}")
    if "time_ours_over_official" in report:
        print(f"ours/official: time {report['time_ours_over_official']:.3f} "
              f"(back to back {report['time_ours_over_official_paired']:.3f}, "
              f"CPU time {report['cpu_time_ours_over_official']:.3f}), "
              f"memory {report.get('memory_ours_over_official', float('nan')):.3f}")
    print(f"machine load max {report['load']['max_loadavg_1min']:.2f} (loaded: {report['load']['machine_loaded']}); "
          f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
