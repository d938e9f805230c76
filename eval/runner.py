"""Running CORE / Core-Extended through lm-eval's Python API across seeds and loop depths, plus bpb, into the JSON
report of ``parcae eval``."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from modeling_parcae.eval.aggregate import fit_all, summarize_depth
from modeling_parcae.eval.bundle import load_baselines, split_available
from modeling_parcae.eval.lm import CPU_BATCH_SIZE, ParcaeLM
from modeling_parcae.eval.modelio import is_looped, supports_output_depths
from modeling_parcae.eval.quiet import silence_lm_eval_git_probe
from modeling_parcae.eval.specs import TASKS

logger = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).parent / "tasks"


def build_tasks(labels: list[str], bundle: str | Path, limit: int | None, baselines: str = "v1") -> dict:
    """lm-eval Task objects for ``labels`` (built once, reused for every seed and depth)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"bundle": str(bundle), "max_per_task": limit, "baselines": baselines})
    task_logger = logging.getLogger("lm_eval.api.task")
    level = task_logger.level
    task_logger.setLevel(logging.ERROR)  # silences a generic per-task "custom kwargs can be passed" notice
    try:
        return manager.load([TASKS[label].task_name for label in labels])["tasks"]
    finally:
        task_logger.setLevel(level)


def _collect_environment_once() -> None:
    """``simple_evaluate`` records torch's environment report (``collect_env``: subprocesses, ~0.5 s) on every call,
    and a depth sweep calls it once per depth and seed; the report cannot change within a process, so it is made
    once (lm-eval has no switch to skip it)."""
    from torch.utils import collect_env

    if not hasattr(collect_env.get_pretty_env_info, "cache_info"):
        collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)


def run_lm_eval(lm: ParcaeLM, tasks: dict, seed: int, log_samples: bool = False) -> dict:
    """{label: {"acc", "acc_centered"[, "samples"]}} for one few-shot seed; samples hold per item the score of every
    option (minus lm-eval's log-likelihood: the mean loss over the scored span with ``--model parcae``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _collect_environment_once()
    silence_lm_eval_git_probe()

    # an empty manager: the tasks are built already, and the default one would index all of lm-eval's stock tasks
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), fewshot_random_seed=seed,
                                  log_samples=log_samples, bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False))
    per_task = {}
    for name, metrics in out["results"].items():
        label = name.removeprefix("core_")
        if label not in TASKS:
            continue
        per_task[label] = {"acc": metrics["acc,none"], "acc_centered": metrics["acc_centered,none"]}
        if log_samples:
            per_task[label]["samples"] = [
                {"doc_id": s["doc_id"], "acc": s["acc"], "mean_loss": [-float(r[0]) for r in s["filtered_resps"]],
                 "greedy": [bool(r[1]) for r in s["filtered_resps"]]}
                for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
    return per_task


def evaluate(model, tokenizer, *, model_name: str, labels: list[str], bundle: str | Path | None,
             seeds: list[int], loops: list[int], limit: int | None = None, batch_size: int | None = None,
             baselines: str = "v1", extended: bool = True, bpb_documents: list[str] | None = None,
             samples: dict | None = None, max_batch_tokens: int | None = None) -> dict:
    """The full report. Tasks whose data file is missing are skipped with a warning naming them; fails only when
    nothing can run. If ``samples`` is a dict it receives per-item scores as samples[depth][seed][label].
    ``batch_size`` / ``max_batch_tokens`` bound a scoring batch's rows / padded tokens (None: ``ParcaeLM``'s
    defaults for the model's device)."""
    from modeling_parcae.eval.bpb import bits_per_byte, bits_per_byte_at_depths

    report: dict = {"model": model_name, "bundle": str(bundle) if bundle else None, "baselines": baselines,
                    "seeds": seeds, "limit": limit, "results": {}}
    tasks = {}
    if labels:
        present, missing = split_available(bundle, labels)
        if missing:
            logger.warning("skipping %d task(s) whose data file is missing from %s: %s", len(missing), bundle,
                           ", ".join(f"{label} (eval_data/{TASKS[label].dataset_uri})" for label in missing))
            report["skipped"] = missing
        if not present and not bpb_documents:
            raise ValueError(f"none of the requested tasks has its data file in {bundle}")
        tasks = build_tasks(present, bundle, limit, baselines) if present else {}
        baseline_values = load_baselines(bundle, baselines)
    looped = report["looped"] = is_looped(model)
    if not looped and len(loops) > 1:
        logger.warning("model is not looped: evaluating once and reporting the same numbers for every depth")
    cached: dict | None = None
    lm = ParcaeLM(model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    bpb_batch = batch_size or CPU_BATCH_SIZE
    sweep = looped and len(loops) > 1 and supports_output_depths(model)
    if sweep:  # every depth from one pass: the first depth's run scores all of them, the others reuse the scores
        lm.sweep_depths = list(dict.fromkeys(loops))
    bpb_by_depth = {}
    if bpb_documents and sweep:
        bpb_by_depth = bits_per_byte_at_depths(model, tokenizer, bpb_documents, list(dict.fromkeys(loops)),
                                                batch_size=bpb_batch)
    for depth in loops:
        lm.num_loops = depth
        if cached is not None and not looped:
            report["results"][str(depth)] = cached
            continue
        entry: dict = {}
        if tasks:
            per_seed = []
            for seed in seeds:
                logger.info("num_loops=%d seed=%d: %d tasks", depth, seed, len(tasks))
                res = run_lm_eval(lm, tasks, seed, log_samples=samples is not None)
                if samples is not None:
                    samples.setdefault(str(depth), {})[str(seed)] = {k: v.pop("samples") for k, v in res.items()}
                per_seed.append({label: r["acc"] for label, r in res.items()})
            entry = summarize_depth(per_seed, baseline_values, extended)
        if bpb_documents:
            entry["bpb"] = bpb_by_depth.get(depth) or bits_per_byte(model, tokenizer, bpb_documents, num_loops=depth,
                                                                   batch_size=bpb_batch)
        report["results"][str(depth)] = cached = entry
    report["fit"] = fit_all(report["results"])
    return report
