"""Stability at small scale: the same looped model trained with three injections, at two learning rates.

The paper's central claim (arXiv 2604.12946; official ``parcae_lm/modules/injection.py``) is that the constrained
diagonal injection (decay = exp(-dt*A) in (0, 1)) keeps the looped state bounded, where the unconstrained linear
injection of prior looped models and plain addition can blow up, especially at high learning rates. This script trains
the ``stability-shakespeare`` recipe six times with ``parcae train`` (diagonal / linear / add x the recipe's learning
rate and 4x it) and records:

* the training loss curve and its spikes (a step whose loss exceeds 1.25x the median of the previous 10 steps),
  plus steps skipped for non-finite gradients;
* the injection's gain on the state: the largest decay for ``diagonal``, the largest singular value of the state
  block ``W[:, :S]`` for ``linear``, 1 for ``add`` (identity);
* the residual-state norm after each of 16 loops (twice the trained mean depth) on held-out text, and the held-out
  loss at 1, 2, 4, 8, 16 loops.

Writes ``scripts/results/stability.json`` and ``stability.png``.

    python scripts/stability.py [--steps 150] [--output-dir runs/stability]
"""

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_parcae import ParcaeForCausalLM
from modeling_parcae.training.data import build_training_data
from modeling_parcae.training.recipe import load_recipe


INJECTIONS = ("diagonal", "linear", "add")
LR_MULTIPLIERS = (1, 4)
PROBE_LOOPS = 16
RESULTS = Path(__file__).parent / "results"


def train_variant(injection: str, multiplier: int, steps: int, output_dir: Path) -> Path:
    recipe = load_recipe("stability-shakespeare")
    overrides = [
        f"model.config.injection_type={injection}",
        f"training.adamw_lr={recipe.training.adamw_lr * multiplier}",
        f"training.muon_lr={recipe.training.muon_lr * multiplier}",
        f"training.max_steps={steps}",
        f"output_dir={output_dir}",
        f"run_name=stability-{injection}-x{multiplier}",
    ]
    shutil.rmtree(output_dir, ignore_errors=True)  # each variant is a fresh run, never a resumed one
    result = subprocess.run([sys.executable, "-m", "modeling_parcae.cli", "train", "stability-shakespeare", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise RuntimeError(f"training {injection} x{multiplier} failed:\n{result.stderr[-2000:]}")
    return output_dir


def loss_spikes(losses: list[float]) -> list[int]:
    spikes = []
    for step in range(10, len(losses)):
        window = statistics.median(losses[step - 10:step])
        if not math.isfinite(losses[step]) or losses[step] > 1.25 * window:
            spikes.append(step)
    return spikes


def injection_gain(model: ParcaeForCausalLM) -> float:
    injection = model.model.injection
    kind = model.config.injection_type
    with torch.no_grad():
        if kind == "diagonal":
            return injection.decay().max().item()
        if kind == "linear":
            state_block = injection.proj.weight[:, : model.config.state_size]
            return torch.linalg.matrix_norm(state_block, ord=2).item()
    return 1.0


def held_out_probe(model: ParcaeForCausalLM, batch: torch.Tensor) -> dict:
    """State norm after each loop (mean over tokens) and held-out loss at several depths."""
    with torch.no_grad():
        out = model(batch, num_loops=PROBE_LOOPS, output_hidden_states=True)
        first_loop = 1 + model.config.num_prelude_layers
        states = out.hidden_states[first_loop:first_loop + PROBE_LOOPS]
        norms = [state.norm(dim=-1).mean().item() for state in states]
        losses = {str(loops): model(batch, labels=batch, num_loops=loops).loss.item() for loops in (1, 2, 4, 8, 16)}
    return dict(state_norm_by_loop=norms, held_out_loss_by_loops=losses)


def held_out_batch(tokenizer, rows: int = 8) -> torch.Tensor:
    recipe = load_recipe("stability-shakespeare")
    _, validation = build_training_data(recipe.data, tokenizer, recipe.seed, main_process_first=contextlib.nullcontext)
    length = min(len(tokens) for tokens in validation[:rows])
    return torch.tensor([tokens[:length] for tokens in validation[:rows]])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = {"diagonal": "tab:green", "linear": "tab:red", "add": "tab:blue"}
    for run in results:
        style = "-" if run["lr_multiplier"] == 1 else "--"
        label = f"{run['injection']} x{run['lr_multiplier']} lr"
        panel = axes[0] if run["lr_multiplier"] == 1 else axes[1]
        panel.plot(run["train_loss"], style, color=colours[run["injection"]], label=label)
        axes[2].plot(range(1, PROBE_LOOPS + 1), run["state_norm_by_loop"], style, color=colours[run["injection"]],
                     label=label)
    for panel, title in zip(axes[:2], ("training loss, recipe lr", "training loss, 4x lr")):
        panel.set(title=title, xlabel="step", ylabel="loss")
        panel.legend()
    axes[2].set(title="residual-state norm after each loop (held-out)", xlabel="loop", ylabel="mean ||h||",
                yscale="log")
    axes[2].axvline(8, color="grey", lw=0.8)
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output-dir", default="runs/stability")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    results = []
    batch = None
    for injection in INJECTIONS:
        for multiplier in LR_MULTIPLIERS:
            run_dir = Path(args.output_dir) / f"{injection}-x{multiplier}"
            start = time.perf_counter()
            train_variant(injection, multiplier, args.steps, run_dir)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train_loss = [r["train/loss"] for r in records]
            skipped = [r["step"] for r in records if r["train/skipped"]]
            model = ParcaeForCausalLM.from_pretrained(run_dir / "final").eval()
            if batch is None:
                batch = held_out_batch(AutoTokenizer.from_pretrained(run_dir / "final"))
            run = dict(injection=injection, lr_multiplier=multiplier, train_loss=train_loss,
                       loss_spikes=loss_spikes(train_loss), skipped_nonfinite_steps=skipped,
                       final_train_loss=train_loss[-1], injection_gain=injection_gain(model),
                       seconds=time.perf_counter() - start, **held_out_probe(model, batch))
            results.append(run)
            print(f"{injection:>8} x{multiplier}: final loss {run['final_train_loss']:.3f}, "
                  f"{len(run['loss_spikes'])} spikes, gain {run['injection_gain']:.3f}, "
                  f"||h|| loop 1/8/16 = {run['state_norm_by_loop'][0]:.3g}/{run['state_norm_by_loop'][7]:.3g}/"
                  f"{run['state_norm_by_loop'][15]:.3g}, held-out loss@8 {run['held_out_loss_by_loops']['8']:.3f}",
                  flush=True)

    RESULTS.mkdir(exist_ok=True)
    summary = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        recipe="configuration/recipes/stability-shakespeare.yaml", steps=args.steps, runs=results,
    )
    (RESULTS / "stability.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, RESULTS / "stability.png")
    print(f"wrote {RESULTS / 'stability.json'} and {RESULTS / 'stability.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
