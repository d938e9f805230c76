"""``parcae eval`` (CORE / Core-Extended / bpb across loop depths and seeds through lm-eval) and ``parcae compare``
(differences between two reports, e.g. Parcae vs a Transformer baseline)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

from modeling_parcae.bundled import model_path_or_name
from modeling_parcae.inputs import check_device, local_path_or_hub_id, read_json_file

from modeling_parcae.atomic import write_atomically
from modeling_parcae.dtypes import DTYPES
from modeling_parcae.eval.specs import CORE_LABELS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (omit the option for no limit), got {value}")
    return value


def register(subparsers) -> None:
    """Add the ``eval`` and ``compare`` subcommands."""
    p = subparsers.add_parser("eval", help="CORE / Core-Extended / bits-per-byte across loop depths (lm-eval)",
                              description=__doc__)
    p.add_argument("--model", required=True, help="converted checkpoint directory, Hub id, or `demo` (the bundled "
                   "demo model)")
    p.add_argument("--tasks", default="core", help="comma list of groups (core, core_extended), task labels, and/or "
                   "bpb (needs --text); default core")
    p.add_argument("--num-loops", type=_int_list, default=None, help="test-time depths, e.g. 1,2,4,8,16 "
                   "(default: the config's num_loops)")
    p.add_argument("--seeds", type=_int_list, default=[1234, 2345, 3456], help="few-shot seeds; every task runs "
                   "once per seed, by default three times (1234,2345,3456, as in the paper)")
    p.add_argument("--limit", type=_positive_int, default=None, help="keep N items per task (the official "
                   "max_per_task: shuffle, keep N, draw few-shot examples from those N only) and the first N bpb "
                   "documents (default: everything)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: 16 on CPU; on a GPU "
                   "no row cap: rows are packed by length up to what half its free memory holds)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="weights and activations dtype (default: "
                   "bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--bundle", default=None, help="eval bundle directory (default: $PARCAE_EVAL_BUNDLE, else "
                   "download once into $PARCAE_CACHE or ~/.cache/parcae)")
    p.add_argument("--baselines", default="v1", choices=["v1", "v2"], help="random baselines for centering "
                   "(v1 = paper-comparable)")
    p.add_argument("--text", default=None, help="text file (.txt: blank-line separated documents; .jsonl: field "
                   "'text') for validation loss / bits-per-byte")
    p.add_argument("--output", default=None, help="report JSON path (the .md table and .png plot go next to it); "
                   "default eval_results/<model>.json")
    p.add_argument("--log-samples", action="store_true", help="also write per-item option scores to "
                   "<output>.samples.json")
    p.set_defaults(func=run_eval)

    c = subparsers.add_parser("compare", help="per-task and aggregate differences between two eval reports")
    c.add_argument("baseline", help="report JSON A (e.g. the Transformer)")
    c.add_argument("candidate", help="report JSON B (e.g. Parcae); differences are B − A")
    c.set_defaults(func=run_compare)


def run_eval(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices drown the progress output
    from modeling_parcae.configuration_parcae import validate_num_loops
    from modeling_parcae.eval.aggregate import markdown_table, plot
    from modeling_parcae.eval.bpb import read_documents
    from modeling_parcae.eval.bundle import resolve_bundle
    from modeling_parcae.eval.modelio import load_model_and_tokenizer
    from modeling_parcae.eval.runner import evaluate
    from modeling_parcae.eval.specs import GROUPS, resolve_task_names

    check_device(args.device)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    for depth in args.num_loops or []:
        validate_num_loops(depth, "--num-loops")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    want_bpb = "bpb" in names
    labels = resolve_task_names([n for n in names if n != "bpb"])
    if want_bpb and not args.text:
        raise ValueError("--tasks bpb needs --text FILE")
    bundle = resolve_bundle(args.bundle) if labels else None
    documents = read_documents(args.text, args.limit) if want_bpb else None
    model, tokenizer = load_model_and_tokenizer(local_path_or_hub_id(model_path_or_name(args.model), "--model"),
                                                device=args.device, dtype=args.dtype)
    loops = args.num_loops or [getattr(model.config, "num_loops", None) or 1]
    samples: dict | None = {} if args.log_samples else None
    report = evaluate(model, tokenizer, model_name=args.model, labels=labels, bundle=bundle, seeds=args.seeds,
                      loops=loops, limit=args.limit, batch_size=args.batch_size, baselines=args.baselines,
                      extended="core_extended" in names or set(labels) == set(GROUPS["core_extended"]),
                      bpb_documents=documents, samples=samples)
    report["dtype"] = args.dtype
    output = Path(args.output or Path("eval_results") / (Path(args.model.rstrip("/")).name + ".json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(report)
    if samples is not None:
        write_atomically(output.with_suffix(".samples.json"), lambda path: path.write_text(json.dumps(samples) + "\n"))
    written = [output, output.with_suffix(".md")]
    if len(set(loops)) > 1:  # a plot against num_loops needs two depths (and matplotlib costs a second to import)
        write_atomically(output.with_suffix(".png"), lambda path: plot(report, path))
        written.append(output.with_suffix(".png"))
    write_atomically(output.with_suffix(".md"), lambda path: path.write_text(table))
    write_atomically(output, lambda path: path.write_text(json.dumps(report, indent=2) + "\n"))
    print(table)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def compare_reports(a: dict, b: dict) -> str:
    """Text table of B − A per task (accuracy ×100) and per aggregate, for every loop depth in both reports. Settings
    that differ (baselines, --limit, seeds, task sets) are warned about first; where the task sets differ, CORE and
    Core-Extended are compared over the tasks both reports ran, never as the reports' own means over different sets."""
    lines = [f"A = {a['model']}  (baselines {a['baselines']})", f"B = {b['model']}  (baselines {b['baselines']})"]
    lines += [f"warning: {difference}" for difference in _setting_differences(a, b)]
    for depth in sorted(set(a["results"]) & set(b["results"]), key=int):
        ra, rb = a["results"][depth], b["results"][depth]
        tasks_a, tasks_b = ra.get("tasks", {}), rb.get("tasks", {})
        common = [t for t in tasks_a if t in tasks_b]
        lines += ["", f"num_loops = {depth}", f"{'task':36s} {'A':>8s} {'B':>8s} {'B-A':>8s}"]
        for label in common:
            x, y = 100 * tasks_a[label]["acc"], 100 * tasks_b[label]["acc"]
            lines.append(f"{label:36s} {x:8.2f} {y:8.2f} {y - x:+8.2f}")
        dropped = sorted(set(tasks_a) ^ set(tasks_b))
        if dropped:
            lines.append(f"dropped (in only one report): {', '.join(dropped)}")
        for metric in ("core", "core_extended"):
            if metric not in ra or metric not in rb:
                continue
            if not dropped:
                lines.append(f"{metric.upper():36s} {ra[metric]:8.2f} {rb[metric]:8.2f} {rb[metric] - ra[metric]:+8.2f}")
                continue
            members = [t for t in common if metric == "core_extended" or t in CORE_LABELS]
            if members and all("centered" in tasks_a[t] and "centered" in tasks_b[t] for t in members):
                x = 100 * statistics.fmean(tasks_a[t]["centered"] for t in members)
                y = 100 * statistics.fmean(tasks_b[t]["centered"] for t in members)
                label = f"{metric.upper()} ({len(members)} common tasks)"
                lines.append(f"{label:36s} {x:8.2f} {y:8.2f} {y - x:+8.2f}")
            else:
                lines.append(f"{metric.upper():36s} not compared: the reports average different task sets")
        if "bpb" in ra and "bpb" in rb:
            x, y = ra["bpb"]["bpb"], rb["bpb"]["bpb"]
            lines.append(f"{'bits per byte':36s} {x:8.4f} {y:8.4f} {y - x:+8.4f}")
    only = sorted(set(a["results"]) ^ set(b["results"]), key=int)
    if only:
        lines.append(f"\nloop depths in only one report: {', '.join(only)}")
    return "\n".join(lines) + "\n"


def _setting_differences(a: dict, b: dict) -> list[str]:
    """What makes two reports' numbers incomparable beyond the models: centering, items (--limit), few-shot seeds,
    task sets."""
    differences = []
    if a["baselines"] != b["baselines"]:
        differences.append("the reports use different baselines; centered values are not comparable")
    if a.get("limit") != b.get("limit"):
        differences.append(f"different --limit (A: {a.get('limit') or 'none'}, B: {b.get('limit') or 'none'}): the "
                           "tasks were scored on different items")
    if a.get("seeds") != b.get("seeds"):
        differences.append(f"different few-shot seeds (A: {a.get('seeds')}, B: {b.get('seeds')})")
    tasks_a = {t for row in a["results"].values() for t in row.get("tasks", {})}
    tasks_b = {t for row in b["results"].values() for t in row.get("tasks", {})}
    if tasks_a != tasks_b:
        differences.append(f"different task sets ({len(tasks_a)} tasks in A, {len(tasks_b)} in B, "
                           f"{len(tasks_a & tasks_b)} in both): CORE / Core-Extended are compared over the common "
                           "tasks only")
    return differences


def read_report(path: str) -> dict:
    """An eval report, with errors naming the file when it is missing, truncated or not a report."""
    report = read_json_file(path, "report")
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict) or "model" not in report:
        raise ValueError(f"report {path} is not a `parcae eval` report (no 'model' and 'results')")
    return report


def run_compare(args: argparse.Namespace) -> int:
    a = read_report(args.baseline)
    b = read_report(args.candidate)
    print(compare_reports(a, b), end="")
    return 0
