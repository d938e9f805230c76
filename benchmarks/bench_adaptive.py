"""Per-token adaptive depth (``exit_threshold``) against fixed depth: compute, speed and quality.

For the bundled demo model and the golden CORE model, at ``num_loops`` 8 and several thresholds:

* held-out loss and bits-per-byte (teacher-forced, ``modeling_parcae/demo/heldout.txt``) and mean loops per token;
  the fixed-depth curve 1..8 comes from one ``output_depths`` pass;
* decode tokens/s of ``generate`` at batch 1 and 8 (greedy, a fixed number of new tokens, runs interleaved, median),
  and the mean loops per generated token;
* greedy agreement with fixed depth: the fraction of generated tokens equal to the fixed-depth continuation.

Writes ``benchmarks/results/adaptive.json`` and ``adaptive.png`` (held-out loss against mean loops per token).

    python benchmarks/bench_adaptive.py [--thresholds 0.002,0.005,0.01,0.02,0.05] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
DEMO = REPO / "modeling_parcae" / "demo"
HELDOUT = DEMO / "heldout.txt"
LOOPS = 8


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other processes; torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads")


def load(name: str, workdir: Path):
    from modeling_parcae import ParcaeForCausalLM, load_tokenizer

    if name == "demo":
        path = DEMO
    else:
        path = workdir / "core_eval_hf"
        if not path.exists():
            subprocess.run(["parcae", "convert", str(SHARED / "golden" / "core_eval" / "model"), str(path),
                            "--tokenizer", str(SHARED / "golden" / "core_eval" / "tokenizer")], check=True)
    model = ParcaeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, load_tokenizer(path)


def heldout_rows(tokenizer, limit: int, max_length: int) -> list[list[int]]:
    """Token rows of the first ``limit`` held-out paragraphs, cut to the context + 1 (as bits-per-byte does)."""
    from modeling_parcae.eval.bpb import read_documents

    docs = read_documents(HELDOUT, limit)
    rows = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return [r[: max_length + 1] for r in rows if len(r) >= 2]


@torch.inference_mode()
def heldout(model, tokenizer, rows, *, depths=None, threshold=None, batch_size=16) -> dict:
    """Loss/bpb per depth of ``depths`` (one pass), or at ``LOOPS`` under ``threshold`` with mean loops per token."""
    from modeling_parcae.scoring import loss_and_bpb, next_token_totals, pad_id_of, pad_right, token_byte_lengths

    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    keys = list(depths) if depths else [threshold]
    totals = {k: torch.zeros(3, dtype=torch.float64) for k in keys}
    loops_sum, tokens = 0, 0
    for b in range(0, len(rows), batch_size):
        batch = rows[b: b + batch_size]
        ids, mask = pad_right([r[:-1] for r in batch], pad_id_of(tokenizer))
        targets, _ = pad_right([r[1:] for r in batch], pad_id_of(tokenizer))
        if depths:
            out = model(ids, attention_mask=mask, output_depths=tuple(depths), use_cache=False)
            logits = dict(zip(depths, out.depth_logits))
        else:
            out = model(ids, attention_mask=mask, num_loops=LOOPS, exit_threshold=threshold, use_cache=False)
            logits = {threshold: out.logits}
            loops_sum += int(out.num_loops[mask.bool()].sum())
            tokens += int(mask.sum())
        for k in keys:
            totals[k] += next_token_totals(logits[k], targets, mask, byte_lengths)
    result = {}
    for k in keys:
        loss, bpb = loss_and_bpb(totals[k])
        result[k] = {"loss": loss, "bpb": bpb}
        if not depths:
            result[k]["mean_loops_per_token"] = loops_sum / tokens
    return result


def prompts(tokenizer, rows, batch: int, length: int = 12):
    from modeling_parcae.scoring import pad_id_of

    chosen = [r[:length] for r in rows if len(r) >= length][:batch]
    ids = torch.tensor(chosen)
    return ids, torch.ones_like(ids), pad_id_of(tokenizer)


@torch.inference_mode()
def decode(model, ids, mask, new_tokens: int, threshold: float | None) -> tuple[float, float, torch.Tensor, float]:
    """(wall seconds, CPU seconds of this process, generated tokens, mean loops per generated token) of one greedy
    ``generate``. With one torch thread the CPU time is the compute spent, much less disturbed than wall time by
    other processes on a shared machine."""
    from modeling_parcae.generation_cli import LoopCounter

    counter = LoopCounter(model)
    kwargs = {} if threshold is None else {"exit_threshold": threshold}
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model.generate(ids, attention_mask=mask, num_loops=LOOPS, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, out[:, ids.shape[1]:], counter.close()


def measure_model(name: str, thresholds: list[float], repeats: int, new_tokens: int, docs: int,
                  workdir: Path) -> dict:
    model, tokenizer = load(name, workdir)
    rows = heldout_rows(tokenizer, docs, model.config.max_position_embeddings)
    fixed = heldout(model, tokenizer, rows, depths=list(range(1, LOOPS + 1)))
    adaptive = {t: heldout(model, tokenizer, rows, threshold=t)[t] for t in thresholds}
    base = fixed[LOOPS]["loss"]
    result = {"fixed": {str(d): v for d, v in fixed.items()}, "thresholds": {}}
    decode_runs: dict = {}
    for batch in (1, 8):
        ids, mask, _ = prompts(tokenizer, rows, batch)
        decode(model, ids, mask, 2, None)  # warm-up
        settings = [None, *thresholds]
        times = {s: [] for s in settings}
        cpu_times = {s: [] for s in settings}
        outputs, loops = {}, {}
        for _ in range(repeats):  # interleaved: fixed, t1, t2, ... then again
            for s in settings:
                seconds, cpu, outputs[s], loops[s] = decode(model, ids, mask, new_tokens, s)
                times[s].append(seconds)
                cpu_times[s].append(cpu)
        decode_runs[batch] = {s: {"tok_per_s": batch * new_tokens / statistics.median(times[s]),
                                  "tok_per_cpu_s": batch * new_tokens / statistics.median(cpu_times[s]),
                                  "mean_loops_per_generated_token": loops[s],
                                  "greedy_agreement": float((outputs[s] == outputs[None]).float().mean())}
                              for s in settings}
    result["fixed_decode"] = {f"batch_{b}": runs[None] for b, runs in decode_runs.items()}
    for t in thresholds:
        row = dict(adaptive[t])
        row["loops_saved_vs_fixed"] = 1 - row["mean_loops_per_token"] / LOOPS
        row["loss_increase_vs_fixed"] = row["loss"] / base - 1
        for b, runs in decode_runs.items():
            row[f"batch_{b}"] = dict(runs[t], speedup_vs_fixed=runs[t]["tok_per_s"] / runs[None]["tok_per_s"],
                                     cpu_speedup_vs_fixed=runs[t]["tok_per_cpu_s"] / runs[None]["tok_per_cpu_s"])
        result["thresholds"][str(t)] = row
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], models.items()):
        depths = sorted(int(d) for d in res["fixed"])
        ax.plot(depths, [res["fixed"][str(d)]["loss"] for d in depths], "o-", color="tab:gray", label="fixed depth")
        xs = [row["mean_loops_per_token"] for row in res["thresholds"].values()]
        ys = [row["loss"] for row in res["thresholds"].values()]
        ax.plot(xs, ys, "s", color="tab:blue", label="adaptive (exit_threshold)")
        for t, x, y in zip(res["thresholds"], xs, ys):
            ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("mean loops per token")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"{name} (num_loops cap {LOOPS})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,golden")
    parser.add_argument("--thresholds", default="0.002,0.005,0.01,0.02,0.05,0.1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--docs", type=int, default=200, help="held-out paragraphs scored")
    parser.add_argument("--workdir", default="/tmp/parcae-bench")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "adaptive.json"))
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    report = {"machine": machine(), "num_loops": LOOPS, "heldout": str(HELDOUT.relative_to(REPO)),
              "rule": "exit when ||h_t - h_{t-1}|| / ||h_t|| < threshold (per token, capped by num_loops)",
              "models": {}}
    for name in args.models.split(","):
        report["models"][name] = measure_model(name, thresholds, args.repeats, args.new_tokens, args.docs,
                                               Path(args.workdir))
        print(json.dumps(report["models"][name], indent=2), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
