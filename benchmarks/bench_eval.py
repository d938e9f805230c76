"""Evaluation time, whole process (python start, imports, model load, task building, scoring, report):

* ``golden``: ``parcae eval`` vs the reference scorer (``modeling_parcae.eval.reference``, the port of the official
  per-item loop: one forward per item with all its options) on the golden ``core_eval`` checkpoint, every available
  task, one seed, one depth; both must give the same accuracies.
* ``preset``: the same comparison on a randomly initialised ``parcae-140m`` preset with a few tasks (compute-bound).
* ``sweep``: ``parcae eval --num-loops 1,2,4,8,16`` vs ``--num-loops 16`` alone (golden checkpoint): every depth comes
  from one pass (``output_depths``), so the sweep should cost little more than its deepest depth.

Runs are interleaved (A, B, A, B, ...) and medians reported, since the machine is shared. Writes
``benchmarks/results/eval_<mode>.json``.

    python benchmarks/bench_eval.py golden --limit 20
    python benchmarks/bench_eval.py sweep --limit 20
    python benchmarks/bench_eval.py preset --limit 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
PYTHON = sys.executable
PARCAE = [PYTHON, "-m", "modeling_parcae.cli"]
PRESET_TASKS = "copa,arc_easy,winograd,lambada_openai"


def machine() -> str:
    import torch

    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other processes; torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads")


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds and CPU seconds (user + system; steadier than wall time on a machine shared with other
    processes) of one whole process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, done.stdout


def eval_command(model: Path, tasks: str, loops: str, limit: int, output: Path, bundle: Path) -> list[str]:
    return [*PARCAE, "eval", "--model", str(model), "--tasks", tasks, "--num-loops", loops, "--limit", str(limit),
            "--seeds", "1234", "--dtype", "float32", "--bundle", str(bundle), "--batch-size", "32",
            "--output", str(output)]


def reference_command(model: Path, tasks: str, loops: int, limit: int, bundle: Path) -> list[str]:
    return [PYTHON, str(Path(__file__).resolve()), "_reference", "--model", str(model), "--tasks", tasks,
            "--num-loops", str(loops), "--limit", str(limit), "--bundle", str(bundle)]


def run_reference(args: argparse.Namespace) -> None:
    """The reference scorer as its own process: prints {task: accuracy}."""
    from modeling_parcae.eval.bundle import split_available
    from modeling_parcae.eval.modelio import load_model_and_tokenizer
    from modeling_parcae.eval.reference import score_task
    from modeling_parcae.eval.specs import resolve_task_names

    model, tokenizer = load_model_and_tokenizer(args.model)
    labels = split_available(args.bundle, resolve_task_names(args.tasks.split(",")))[0]
    accs = {label: score_task(model, tokenizer, args.bundle, label, seed=1234, limit=args.limit,
                              num_loops=args.num_loops)["acc"] for label in labels}
    print(json.dumps(accs))


def report_accuracies(path: Path, depth: str) -> dict[str, float]:
    return {label: row["acc"] for label, row in json.loads(path.read_text())["results"][depth]["tasks"].items()}


def interleave(commands: dict[str, list[str]], repeats: int) -> tuple[dict, dict[str, str]]:
    """Run the commands in turn, ``repeats`` rounds; {"wall"|"cpu": {name: [seconds per round]}} and last stdouts."""
    times: dict = {"wall": {name: [] for name in commands}, "cpu": {name: [] for name in commands}}
    outputs: dict[str, str] = {}
    for _ in range(repeats):
        for name, command in commands.items():
            seconds, cpu, outputs[name] = timed(command)
            times["wall"][name].append(seconds)
            times["cpu"][name].append(cpu)
            print(f"{name}: {seconds:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return times, outputs


def medians(times: dict) -> dict:
    return {kind: {name: statistics.median(v) for name, v in runs.items()} for kind, runs in times.items()}


def golden_model(workdir: Path) -> Path:
    out = workdir / "core_eval_hf"
    if not out.exists():
        subprocess.run([*PARCAE, "convert", str(SHARED / "golden" / "core_eval" / "model"), str(out), "--tokenizer",
                        str(SHARED / "golden" / "core_eval" / "tokenizer")], check=True, capture_output=True)
    return out


def preset_model(workdir: Path) -> Path:
    """Random ``parcae-140m`` (fp32) with the golden test tokenizer (ids < 288 of its 32768-token vocabulary)."""
    import torch

    from modeling_parcae import ParcaeForCausalLM
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer
    from modeling_parcae.presets import load_preset

    out = workdir / "parcae-140m-random"
    if not out.exists():
        torch.manual_seed(0)
        config = load_preset("parcae-140m", bos_token_id=0, eos_token_id=1, pad_token_id=2)
        ParcaeForCausalLM(config).save_pretrained(out)
        load_official_tokenizer(REPO / "tests" / "fixtures" / "golden" / "tokenizer",
                                config.max_position_embeddings).save_pretrained(out)
    return out


def compare_with_reference(model: Path, tasks: str, loops: int, limit: int, bundle: Path, repeats: int,
                           workdir: Path) -> dict:
    output = workdir / f"eval_{model.name}.json"  # per model: benchmarks sharing a workdir must not overwrite it
    times, outputs = interleave({"parcae_eval": eval_command(model, tasks, str(loops), limit, output, bundle),
                                 "reference": reference_command(model, tasks, loops, limit, bundle)}, repeats)
    reference_acc = json.loads(outputs["reference"].strip().splitlines()[-1])
    median = medians(times)
    return {"tasks": tasks, "num_loops": loops, "limit": limit, "seeds": [1234], "seconds": times,
            "median_seconds": median,
            "time_vs_reference": median["wall"]["parcae_eval"] / median["wall"]["reference"],
            "cpu_time_vs_reference": median["cpu"]["parcae_eval"] / median["cpu"]["reference"],
            "same_accuracies": report_accuracies(output, str(loops)) == reference_acc,
            "tasks_scored": len(reference_acc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["golden", "preset", "sweep", "_reference"])
    parser.add_argument("--bundle", default=str(SHARED / "eval_bundle"))
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-loops", type=int, default=None)
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workdir", default=None, help="keeps converted/random models between runs")
    args = parser.parse_args()
    if args.mode == "_reference":
        return run_reference(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle)
    report: dict = {"machine": machine(), "mode": args.mode, "python": platform.python_version(),
                    "process": "whole process: interpreter start, imports, model load, tasks, scoring, report"}
    if args.mode == "golden":
        report["model"] = "golden core_eval (d=64, prelude/core/coda 2/2/2, 768 context), converted"
        report.update(compare_with_reference(golden_model(workdir), args.tasks or "core_extended",
                                             args.num_loops or 4, args.limit, bundle, args.repeats, workdir))
        report["goal_time_vs_reference_at_most"] = 0.5
    elif args.mode == "preset":
        report["model"] = "parcae-140m preset, random init, fp32 (d=768, 2/2/2, 2048 context)"
        report.update(compare_with_reference(preset_model(workdir), args.tasks or PRESET_TASKS, args.num_loops or 2,
                                             args.limit, bundle, args.repeats, workdir))
        report["goal_time_vs_reference_at_most"] = 0.5
    else:
        model = golden_model(workdir)
        tasks = args.tasks or "core_extended"
        sweep_out, deep_out = workdir / "sweep.json", workdir / "deep.json"
        times, _ = interleave({"sweep_1_2_4_8_16": eval_command(model, tasks, "1,2,4,8,16", args.limit, sweep_out,
                                                                 bundle),
                               "only_16": eval_command(model, tasks, "16", args.limit, deep_out, bundle)}, args.repeats)
        median = medians(times)
        report.update({"model": "golden core_eval, converted", "tasks": tasks, "limit": args.limit, "seeds": [1234],
                       "seconds": times, "median_seconds": median,
                       "sweep_vs_deepest": median["wall"]["sweep_1_2_4_8_16"] / median["wall"]["only_16"],
                       "sweep_vs_deepest_cpu": median["cpu"]["sweep_1_2_4_8_16"] / median["cpu"]["only_16"],
                       "deepest_identical_in_both": report_accuracies(sweep_out, "16") == report_accuracies(
                           deep_out, "16"),
                       "goal_sweep_vs_deepest_at_most": 1.3})
    path = REPO / "benchmarks" / "results" / f"eval_{args.mode}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
