"""Evaluation time, whole process (python start, imports, model load, task building, scoring, report):

* ``golden``: ``parcae eval`` vs the reference scorer (``modeling_parcae.eval.reference``, the port of the official
  per-item loop: one forward per item with all its options) on the golden ``core_eval`` checkpoint, every available
  task, one seed, one depth; both must give the same accuracies.
* ``preset``: the same comparison on a randomly initialised ``parcae-140m`` preset with a few tasks (compute-bound).
* ``sweep``: ``parcae eval --num-loops 1,2,4,8,16`` vs ``--num-loops 16`` alone (golden checkpoint): every depth comes
  from one pass (``output_depths``), so the sweep should cost little more than its deepest depth.
* ``official``: ``parcae eval`` vs the official evaluator (``receval.tasks.core_extended_eval`` of the official source
  named by ``PARCAE_OFFICIAL_SRC``, running the official model class on the same weights, under its own process
  settings: bf16 autocast and TF32 on CUDA), Core-Extended at a fixed ``--limit``, 8 loops, one seed, on CUDA: a
  random-weight ``parcae-140m``, ours in its GPU defaults (bfloat16, batches packed up to the memory budget). Both
  write per-item results, compared item by item; an item may flip only where our best option leads by less than
  ``FLIP_MARGIN`` (bf16 autocast and bf16 weights round differently). ``--smoke``: a tiny model on CPU in fp32
  (the official process then runs without autocast), three zero-shot tasks, under a minute on an idle machine (two
  interpreter starts); without ``PARCAE_OFFICIAL_SRC`` the official side is skipped with the reason in the JSON.

Runs are interleaved (A, B, A, B, ...) and medians reported, since the machine is shared. Writes
``benchmarks/results/eval_<mode>.json`` (``eval_official_smoke.json`` for the smoke run).

    python benchmarks/bench_eval.py golden --limit 20
    python benchmarks/bench_eval.py sweep --limit 20
    python benchmarks/bench_eval.py preset --limit 4
    PARCAE_OFFICIAL_SRC=/work/official python benchmarks/bench_eval.py official --limit 100   # a GPU, < 3 min
    PARCAE_OFFICIAL_SRC=/work/official python benchmarks/bench_eval.py official --smoke       # CPU, < 1 min
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
# the timed processes run outside the checkout: from its root, ``python -m`` would import the checkout's
# ``modeling_parcae`` folder (without ``eval/``) instead of an installed (non-editable) package
OUTSIDE = Path(tempfile.gettempdir())
PARCAE = [PYTHON, "-m", "modeling_parcae.cli"]
PRESET_TASKS = "copa,arc_easy,winograd,lambada_openai"
SMOKE_TASKS = "copa,winograd,lambada_openai"  # zero-shot: the official code needs more items than shots
SEED = 1234
# mean nats per token: an item scored by both evaluators may be judged differently only where our best option leads
# the next by less than this (bf16 weights vs the official bf16 autocast over fp32 weights round differently)
FLIP_MARGIN = 0.02


def machine() -> str:
    import torch

    import transformers

    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{os.cpu_count()} CPU cores ({platform.machine()}), shared with other processes; torch "
            f"{torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds and CPU seconds (user + system; steadier than wall time on a machine shared with other
    processes) of one whole process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=OUTSIDE)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, done.stdout


def eval_command(model: Path, tasks: str, loops: str, limit: int, output: Path, bundle: Path) -> list[str]:
    return [*PARCAE, "eval", "--model", str(model), "--tasks", tasks, "--num-loops", loops, "--limit", str(limit),
            "--seeds", str(SEED), "--dtype", "float32", "--bundle", str(bundle), "--batch-size", "32",
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


# -- ours vs the official evaluator ------------------------------------------------------------------------------------

def random_model(workdir: Path, smoke: bool) -> Path:
    """``parcae-140m`` with N(0, 0.02) weights (``released_models.build_parcae``), or for ``--smoke`` a tiny model with
    a 256-token context, saved in fp32 with the golden test tokenizer."""
    import torch

    from modeling_parcae import ParcaeConfig, ParcaeForCausalLM
    from modeling_parcae.conversion.tokenizer import load_official_tokenizer

    out = workdir / ("tiny-random" if smoke else "parcae-140m-n002")
    if (out / "config.json").exists():
        return out
    if smoke:
        torch.manual_seed(0)
        model = ParcaeForCausalLM(ParcaeConfig(vocab_size=288, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=2, num_prelude_layers=1, num_core_layers=1,
                                               num_coda_layers=1, mean_recurrence=8, max_position_embeddings=256))
    else:
        from released_models import build_parcae

        model = build_parcae("parcae-140m", torch.float32)
    tokenizer = load_official_tokenizer(REPO / "tests" / "fixtures" / "golden" / "tokenizer",
                                        model.config.max_position_embeddings)
    # the official side loads the tokenizer alone: from the model folder, AutoTokenizer would ask about its remote code
    tokenizer.save_pretrained(tokenizer_folder(out))
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)  # last: its config.json marks a complete folder
    return out


def tokenizer_folder(model: Path) -> Path:
    return model.with_name(model.name + "-tokenizer")


def official_command(model: Path, tasks: str | None, limit: int, device: str, bundle: Path, output: Path
                     ) -> list[str]:
    return [PYTHON, str(Path(__file__).resolve()), "_official", "--model", str(model), "--limit", str(limit),
            "--device", device, "--bundle", str(bundle), "--output", str(output), *(["--tasks", tasks] if tasks else [])]


def run_official(args: argparse.Namespace) -> None:
    """The official evaluator as its own process, as its ``scripts/eval.py`` runs ``core_extended``: its CUDA backend
    settings, bf16 autocast on CUDA, ``run_core_extended_eval`` with the model's context as ``max_seq_len``. Its model
    is the official class on the weights of ``--model`` (``released_models.build_official``). Writes per task the
    accuracy and per item whether it was right (recorded around the official ``evaluate_example``)."""
    import contextlib

    import torch

    from released_models import build_official, import_official
    from modeling_parcae import ParcaeForCausalLM

    start = time.perf_counter()
    model_class, reason = import_official()
    if model_class is None:
        raise SystemExit(reason)
    from parcae_lm.tokenizer import Tokenizer
    from receval.tasks import core_eval, core_extended_eval

    device = torch.device(args.device)
    if device.type == "cuda":  # scripts/eval.py, setup_distributed
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        torch.backends.cuda.enable_math_sdp(False)
    ours = ParcaeForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = build_official(model_class, ours).to(device).eval()
    tokenizer = Tokenizer(str(tokenizer_folder(Path(args.model))))
    if args.tasks:
        wanted = args.tasks.split(",")
        core_extended_eval.CORE_EXTENDED_TASKS[:] = [t for t in core_extended_eval.CORE_EXTENDED_TASKS
                                                    if t["label"] in wanted]
    # the official evaluator reads the bundle from $PARCAE_CACHE/eval_bundle
    cache = Path(tempfile.mkdtemp(prefix="official-cache-"))
    (cache / "eval_bundle").symlink_to(Path(args.bundle).resolve())
    os.environ["PARCAE_CACHE"] = str(cache)
    items: list[list[bool]] = []  # per task, in the order the official loop runs them
    evaluate_task, evaluate_example = core_extended_eval.evaluate_task, core_eval.evaluate_example

    def task_recorded(*args, **kwargs):
        items.append([])
        return evaluate_task(*args, **kwargs)

    def recorded(*args, **kwargs):
        right = evaluate_example(*args, **kwargs)
        items[-1].append(bool(right))
        return right

    core_extended_eval.evaluate_task = task_recorded
    core_eval.evaluate_example = recorded
    loaded = time.perf_counter()
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    with autocast:
        result = core_extended_eval.run_core_extended_eval(model, tokenizer, device,
                                                           max_seq_len=ours.config.max_position_embeddings,
                                                           max_per_task=args.limit, seeds=[SEED])
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_task = dict(zip(result["results"], items))
    Path(args.output).write_text(json.dumps({
        "tasks": result["results"], "core": 100 * result["core_metric"],
        "core_extended": 100 * result["core_extended_metric"], "items": per_task,
        "seconds": {"start_to_loaded": loaded - start, "scoring": time.perf_counter() - loaded}}) + "\n")


def compare_items(ours_samples: dict[str, list[dict]], official_items: dict[str, list[bool]]) -> dict:
    """Item-by-item agreement; every disagreement with our lead of the best option over the next (None for
    language-modelling items, judged by greedy exact match)."""
    compared, flips = 0, []
    for label, theirs in official_items.items():
        mine = ours_samples.get(label, [])
        if len(mine) != len(theirs):
            flips.append({"task": label, "error": f"{len(mine)} items here, {len(theirs)} in the official run"})
            continue
        for index, (sample, right) in enumerate(zip(mine, theirs)):
            compared += 1
            if bool(sample["acc"]) != right:
                losses = sorted(sample["mean_loss"])
                flips.append({"task": label, "item": index, "ours": bool(sample["acc"]), "official": right,
                              "our_margin": losses[1] - losses[0] if len(losses) > 1 else None})
    beyond = [f for f in flips if f.get("our_margin") is None or f["our_margin"] >= FLIP_MARGIN]
    return {"items_compared": compared, "items_differing": len(flips), "flip_margin": FLIP_MARGIN,
            "items_differing_beyond_margin": len(beyond), "differing": flips}


def compare_with_official(args: argparse.Namespace, workdir: Path, bundle: Path) -> dict:
    """Whole-process wall time of ``parcae eval`` and of the official evaluator on the same model, tasks and items,
    and their per-item agreement."""
    from released_models import import_official

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    model = random_model(workdir, smoke)
    tasks = args.tasks or (SMOKE_TASKS if smoke else "core_extended")
    limit = args.limit if args.limit is not None else (5 if smoke else 100)
    ours_out, official_out = workdir / "ours.json", workdir / "official.json"
    ours = [*PARCAE, "eval", "--model", str(model), "--tasks", tasks, "--num-loops", "8", "--limit", str(limit),
            "--seeds", str(SEED), "--device", device, "--dtype", "float32" if smoke else "bfloat16",
            "--bundle", str(bundle), "--output", str(ours_out), "--log-samples"]
    report: dict = {"model": f"{model.name}: random weights, fp32 on disk", "device": device, "tasks": tasks,
                    "limit": limit, "num_loops": 8, "seeds": [SEED], "ours": " ".join(ours[2:])}
    commands = {"parcae_eval": ours}
    _, reason = import_official()
    if reason:
        report["official_skipped"] = reason
        print(f"official evaluator skipped: {reason}", flush=True)
    else:
        commands["official"] = official_command(model, None if tasks == "core_extended" else tasks, limit, device,
                                                bundle, official_out)
    if not smoke:  # untimed: libraries into the page cache and their bytecode compiled, for whichever runs first
        warm = ("import torch, transformers, datasets, lm_eval.evaluator, modeling_parcae.eval.runner; "
                "torch.zeros(1, device='cuda')")
        subprocess.run([PYTHON, "-c", warm], check=True, cwd=OUTSIDE)
    times, _ = interleave(commands, args.repeats)
    median = medians(times)
    mine = json.loads(ours_out.read_text())["results"]["8"]
    report.update({"seconds": times, "median_seconds": median, "ours_core": mine.get("core"),
                   "ours_core_extended": mine.get("core_extended"), "tasks_scored": len(mine["tasks"])})
    if "official" in commands:
        theirs = json.loads(official_out.read_text())
        samples = json.loads(ours_out.with_suffix(".samples.json").read_text())["8"][str(SEED)]
        report.update({
            "time_vs_official": median["wall"]["parcae_eval"] / median["wall"]["official"],
            "goal_time_vs_official_at_most": 0.3,
            "official_core": theirs["core"], "official_core_extended": theirs["core_extended"],
            "official_phases_seconds": theirs["seconds"],
            "same_tasks": sorted(theirs["tasks"]) == sorted(mine["tasks"]),
            # the official accuracy is a float32 mean
            "same_accuracies": all(k in mine["tasks"] and abs(mine["tasks"][k]["acc"] - v) < 1e-6
                                   for k, v in theirs["tasks"].items()),
            "items": compare_items(samples, theirs["items"])})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["golden", "preset", "sweep", "official", "_reference", "_official"])
    parser.add_argument("--bundle", default=str(SHARED / "eval_bundle"))
    parser.add_argument("--limit", type=int, default=None, help="items per task (default 20; official: 100, smoke 5)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-loops", type=int, default=None)
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--workdir", default=None, help="keeps converted/random models between runs")
    parser.add_argument("--smoke", action="store_true", help="official mode: tiny model, three tasks, CPU")
    parser.add_argument("--device", default="cuda", help="_official: torch device")
    parser.add_argument("--output", default=None, help="report path (default benchmarks/results/eval_<mode>.json)")
    args = parser.parse_args()
    if args.mode == "_reference":
        return run_reference(args)
    if args.mode == "_official":
        return run_official(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eval-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle).resolve()
    report: dict = {"machine": machine(), "mode": args.mode, "python": platform.python_version(),
                    "process": "whole process: interpreter start, imports, model load, tasks, scoring, report"}
    if args.mode != "official" and args.limit is None:
        args.limit = 20
    if args.mode == "official":
        report.update(compare_with_official(args, workdir, bundle))
    elif args.mode == "golden":
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
    path = Path(args.output or REPO / "benchmarks" / "results" / f"eval_{args.mode}{'_smoke' if args.smoke else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
