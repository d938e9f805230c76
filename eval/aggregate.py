"""Turning per-seed task accuracies into the paper's numbers (centered accuracy, CORE, Core-Extended ×100 with the
spread over seeds), fitting the test-time law S(T) = S∞ − (S∞ − S0)·exp(−k·T), and rendering table and plot."""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import numpy as np

from modeling_parcae.eval.specs import CORE_LABELS, TASKS


def centered(acc: float, baseline: float) -> float:
    return (acc - baseline) / (1.0 - baseline)


def summarize_depth(per_seed: list[dict[str, float]], baselines: dict[str, float], extended: bool) -> dict:
    """Aggregate one loop depth. ``per_seed``: one {label: acc} per seed. CORE = mean centered accuracy over the CORE
    tasks that ran; Core-Extended (only when requested) = over all tasks that ran; both per seed, then mean and
    population std over seeds, ×100 like the paper. Task accuracies stay fractions."""
    labels = [label for label in TASKS if label in per_seed[0]]
    tasks = {}
    for label in labels:
        accs = [seed_result[label] for seed_result in per_seed]
        tasks[label] = {"acc": statistics.fmean(accs), "acc_std": statistics.pstdev(accs),
                        "centered": statistics.fmean(centered(a, baselines[label]) for a in accs),
                        "baseline": baselines[label]}
    out: dict = {"tasks": tasks}
    groups = {"core": [label for label in labels if label in CORE_LABELS]}
    if extended:
        groups["core_extended"] = labels
    for name, members in groups.items():
        if not members:
            continue
        per_seed_score = [100 * statistics.fmean(centered(r[m], baselines[m]) for m in members) for r in per_seed]
        out[name] = statistics.fmean(per_seed_score)
        out[f"{name}_std"] = statistics.pstdev(per_seed_score)
        out[f"{name}_tasks"] = len(members)
    return out


def saturating(t, s_inf, s0, k):
    return s_inf - (s_inf - s0) * np.exp(-k * np.asarray(t, dtype=float))


def fit_saturating(loops: list[int], scores: list[float]) -> dict:
    """Least-squares fit of S(T) = S∞ − (S∞ − S0)·exp(−k·T) with k ≥ 0. With fewer than three depths the fit is
    underdetermined (one of many exact solutions is returned and flagged)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    t = np.asarray(loops, dtype=float)
    y = np.asarray(scores, dtype=float)
    if len(t) < 2:
        return {"n_points": len(t), "status": "needs at least two loop depths"}
    p0 = [float(y[np.argmax(t)]), float(y[np.argmin(t)]), 0.5]
    with warnings.catch_warnings():  # the covariance is undefined for an underdetermined fit; it is not reported
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(saturating, t, y, p0=p0, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, 50.0]),
                              method="trf", maxfev=20000)
    s_inf, s0, k = (float(p) for p in params)
    rmse = math.sqrt(float(np.mean((saturating(t, s_inf, s0, k) - y) ** 2)))
    return {"S_inf": s_inf, "S0": s0, "k": k, "rmse": rmse, "n_points": len(t), "underdetermined": len(t) < 3,
            "formula": "S(T) = S_inf - (S_inf - S0) * exp(-k * T)"}


def _metric_points(results: dict[str, dict], metric: str) -> list[tuple[int, float]]:
    """(num_loops, value) pairs of ``metric``: ``core``, ``core_extended`` or ``val_loss`` (the bpb run's loss)."""
    points = []
    for t in sorted(int(t) for t in results):
        row = results[str(t)]
        if metric == "val_loss" and "bpb" in row:
            points.append((t, row["bpb"]["loss"]))
        elif metric in row:
            points.append((t, row[metric]))
    return points


def fit_all(results: dict[str, dict]) -> dict:
    """The test-time law fitted to every metric present (a falling loss fits with S_inf < S0)."""
    fits = {}
    for metric in ("core", "core_extended", "val_loss"):
        points = _metric_points(results, metric)
        if points:
            fits[metric] = fit_saturating([p[0] for p in points], [p[1] for p in points])
    return fits


def markdown_table(report: dict) -> str:
    """Tasks as rows, loop depths as columns: accuracy (± std over seeds), then CORE / Core-Extended and bpb."""
    loops = sorted(report["results"], key=int)
    head = "| task | " + " | ".join(f"T={t}" for t in loops) + " |"
    lines = [f"# {report['model']} — baselines {report['baselines']}, seeds {report['seeds']}", "", head,
             "|---|" + "---|" * len(loops)]
    labels = [label for label in TASKS if any(label in report["results"][t].get("tasks", {}) for t in loops)]
    for label in labels:
        cells = []
        for t in loops:
            row = report["results"][t]["tasks"].get(label)
            cells.append(f"{100 * row['acc']:.2f} ± {100 * row['acc_std']:.2f}" if row else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for metric in ("core", "core_extended"):
        if any(metric in report["results"][t] for t in loops):
            cells = [f"**{report['results'][t][metric]:.2f} ± {report['results'][t][metric + '_std']:.2f}**"
                     if metric in report["results"][t] else "" for t in loops]
            lines.append(f"| **{metric.upper().replace('_', '-')}** | " + " | ".join(cells) + " |")
    if any("bpb" in report["results"][t] for t in loops):
        lines.append("| val loss (nats/token) | " + " | ".join(
            f"{report['results'][t]['bpb']['loss']:.4f}" for t in loops) + " |")
        lines.append("| bits per byte | " + " | ".join(
            f"{report['results'][t]['bpb']['bpb']:.4f}" for t in loops) + " |")
    for metric, fit in report.get("fit", {}).items():
        if "S_inf" in fit:
            note = " (underdetermined: fewer than 3 depths)" if fit["underdetermined"] else ""
            lines.append(f"\n{metric}: S(T) = {fit['S_inf']:.3f} − ({fit['S_inf']:.3f} − {fit['S0']:.3f})·"
                         f"exp(−{fit['k']:.3f}·T), rmse {fit['rmse']:.3f}{note}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """CORE / Core-Extended (and held-out loss, if measured) against num_loops with the fitted saturating exponential."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    panels = []
    if _metric_points(results, "core") or _metric_points(results, "core_extended"):
        panels.append(("centered accuracy ×100", ("core", "core_extended")))
    if _metric_points(results, "val_loss"):
        panels.append(("held-out loss (nats/token)", ("val_loss",)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    colours = {"core": "tab:blue", "core_extended": "tab:orange", "val_loss": "tab:green"}
    loops = sorted(int(t) for t in results)
    for ax, (ylabel, metrics) in zip(axes[0], panels):
        for metric in metrics:
            pts = _metric_points(results, metric)
            if not pts:
                continue
            errors = [results[str(t)].get(metric + "_std", 0.0) for t, _ in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=errors, fmt="o", color=colours[metric],
                        label=metric.replace("_", "-").upper() if metric != "val_loss" else "held-out loss")
            fit = report.get("fit", {}).get(metric, {})
            if "S_inf" in fit:
                grid = np.linspace(min(loops), max(loops), 200)
                ax.plot(grid, saturating(grid, fit["S_inf"], fit["S0"], fit["k"]), color=colours[metric], alpha=0.7,
                        label=f"fit: S∞={fit['S_inf']:.3f}, S0={fit['S0']:.3f}, k={fit['k']:.2f}")
        ax.set_xlabel("num_loops (test-time recurrence T)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_title(str(report["model"])[-60:])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
