"""Training throughput and peak memory on CPU at 8 loops with truncated backprop through 1, 2, 4 and 8 of them.

Each depth runs in a fresh subprocess (peak memory is a per-process high-water mark). A step is the real training
step of ``parcae train``: forward with ``num_loops=(8 - k, k)``, cross-entropy, backward, Muon + AdamW step.

Memory, from the kernel's peak resident set size (``VmHWM``), with glibc's mmap threshold fixed at 64 KiB so freed
tensors leave the resident set:
* ``peak_total_mb``: the whole process during the timed steps (Python, torch, weights, optimizer state, activations);
* ``peak_training_mb``: the same minus the resident size just before the first timed step, which already holds the
  model, its optimizer state and the runtime, i.e. what one training step adds (activations, gradients, logits).
  This is the CPU analogue of the GPU figure the paper reports and what the truncation acceptance check uses.

Model: the parcae-140m layout (prelude/core/coda 2/2/2, head_dim 128, diagonal injection, value embeddings,
mean_recurrence 8) at width 256 and vocabulary 4096 so that one CPU step takes seconds.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py     # writes benchmarks/results/training.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

LOOPS = 8
DEPTHS = (1, 2, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results" / "training.json"
MODEL = dict(preset="parcae-140m", hidden_size=512, intermediate_size=2048, num_attention_heads=4, vocab_size=4096,
             max_position_embeddings=2048)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(backprop_depth: int, batch_size: int, seq_len: int, steps: int) -> dict:
    """One depth: warm-up step, then ``steps`` timed steps with the peak RSS reset just before them."""
    import torch
    import torch.nn.functional as F

    from modeling_parcae import ParcaeForCausalLM, load_preset
    from modeling_parcae.training.optim import build_optimizers
    from modeling_parcae.training.recipe import TrainingRecipe

    torch.manual_seed(0)
    fields = dict(MODEL)
    config = load_preset(fields.pop("preset"), **fields)
    model = ParcaeForCausalLM(config).train()
    optimizers = build_optimizers(model, TrainingRecipe(max_steps=steps + 1))
    batch = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
    loops = (LOOPS - backprop_depth, backprop_depth)

    def step() -> None:
        logits = model(input_ids=batch[:, :-1], num_loops=loops).logits
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # allocates optimizer state
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up step's freed memory back to the kernel
    baseline_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    started = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - started
    peak_kb = _status_kb("VmHWM")
    return {
        "backprop_depth": backprop_depth, "num_loops": LOOPS,
        "tokens_per_s": batch_size * seq_len * steps / elapsed, "seconds_per_step": elapsed / steps,
        "peak_total_mb": peak_kb / 1024, "peak_training_mb": (peak_kb - baseline_kb) / 1024,
        "resident_before_mb": baseline_kb / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", type=int, metavar="DEPTH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.batch_size, args.seq_len, args.steps)))
        return 0

    rows = []
    for depth in DEPTHS:
        command = [sys.executable, __file__, "--worker", str(depth), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                     # fixed mmap threshold: large tensors are mmapped and unmapped on free, so the
                                     # resident size follows live memory instead of glibc's retained heap
                                     "MALLOC_MMAP_THRESHOLD_": "65536"})
        rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"backprop {depth}/{LOOPS}: {row['tokens_per_s']:8.0f} tok/s  "
              f"peak training {row['peak_training_mb']:7.1f} MB  peak total {row['peak_total_mb']:7.1f} MB", flush=True)
    by_depth = {row["backprop_depth"]: row for row in rows}
    ratio = by_depth[4]["peak_training_mb"] / by_depth[8]["peak_training_mb"]
    ratio_total = by_depth[4]["peak_total_mb"] / by_depth[8]["peak_total_mb"]
    passed = ratio <= 0.65
    print(f"peak training memory, backprop 4 vs 8: {ratio:.3f} (acceptance <= 0.65: {'PASS' if passed else 'FAIL'}); "
          f"whole-process peak ratio {ratio_total:.3f}")
    import torch

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "training", "device": "cpu", "model": MODEL, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "timed_steps": args.steps, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "machine": platform.machine(), "results": rows,
        "peak_training_ratio_depth4_vs_8": ratio, "peak_total_ratio_depth4_vs_8": ratio_total,
        "acceptance_depth4_le_0.65x_full": passed,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
