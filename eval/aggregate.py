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


MAX_K = 50.0  # upper bound of the fitted decay rate


def saturating(t, s_inf, s0, k):
    return s_inf - (s_inf - s0) * np.exp(-k * np.asarray(t, dtype=float))


def fit_saturating(loops: list[int], scores: list[float]) -> dict:
    """Least-squares fit of S(T) = S∞ − (S∞ − S0)·exp(−k·T) with 0 ≤ k ≤ 50.

    The fit is a law only when the points pin it down. It is flagged ``"underdetermined": true`` with the
    ``"reason"`` when they do not: fewer than three depths (many curves pass through the points), scores that do
    not move with the depth, a decay rate at its bound (the points show no saturation within the measured depths), or
    an asymptote far outside the measured scores (an extrapolated trend, e.g. S∞ = -42175 from scores near -6)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    t = np.asarray(loops, dtype=float)
    y = np.asarray(scores, dtype=float)
    if len(t) < 2:
        return {"n_points": len(t), "status": "needs at least two loop depths"}
    p0 = [float(y[np.argmax(t)]), float(y[np.argmin(t)]), 0.5]
    with warnings.catch_warnings():  # the covariance is undefined for an underdetermined fit; it is not reported
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(saturating, t, y, p0=p0, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, MAX_K]),
                              method="trf", maxfev=20000)
    s_inf, s0, k = (float(p) for p in params)
    rmse = math.sqrt(float(np.mean((saturating(t, s_inf, s0, k) - y) ** 2)))
    reason = _why_not_a_law(t, y, s_inf, k)
    fit = {"S_inf": s_inf, "S0": s0, "k": k, "rmse": rmse, "n_points": len(t), "underdetermined": reason is not None,
           "formula": "S(T) = S_inf - (S_inf - S0) * exp(-k * T)"}
    if reason:
        fit["reason"] = reason
    return fit


def _why_not_a_law(t: np.ndarray, y: np.ndarray, s_inf: float, k: float) -> str | None:
    span = float(y.max() - y.min())
    if len(t) < 3:
        return "fewer than 3 loop depths: many curves pass through the points"
    if span <= 1e-12 * max(1.0, float(np.abs(y).max())):
        return "the scores do not change with the loop depth"
    if k <= 1e-3 or k >= 0.999 * MAX_K:
        return f"the decay rate k={k:.3g} is at its bound: the points show no saturation between T={t.min():g} and " \
               f"T={t.max():g}"
    if not y.min() - span <= s_inf <= y.max() + span:
        return f"the asymptote S_inf={s_inf:.4g} lies far outside the measured scores ({y.min():.4g} to " \
               f"{y.max():.4g}): an extrapolated trend, not a saturation"
    return None


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
    labels = [label for label in TASKS if any(label in report["results"][t].get("tasks", {}) for t in loops)]
    # centering baselines and few-shot seeds apply to scored tasks only, not to a bits-per-byte-only run
    title = f"baselines {report['baselines']}, seeds {report['seeds']}" if labels else "held-out text"
    head = f"| {'task' if labels else 'metric'} | " + " | ".join(f"T={t}" for t in loops) + " |"
    lines = [f"# {report['model']} — {title}", "", head, "|---|" + "---|" * len(loops)]
    for label in labels:
        cells = []
        for t in loops:
            row = report["results"][t]["tasks"].get(label)
            cells.append(_with_spread(100 * row["acc"], 100 * row["acc_std"], report["seeds"]) if row else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for metric in ("core", "core_extended"):
        if any(metric in report["results"][t] for t in loops):
            rows = [report["results"][t] for t in loops]
            cells = [f"**{_with_spread(row[metric], row[metric + '_std'], report['seeds'])}**" if metric in row else ""
                     for row in rows]
            lines.append(f"| **{metric.upper().replace('_', '-')}** | " + " | ".join(cells) + " |")
    if any("bpb" in report["results"][t] for t in loops):
        lines.append("| val loss (nats/token) | " + " | ".join(
            f"{report['results'][t]['bpb']['loss']:.4f}" for t in loops) + " |")
        lines.append("| bits per byte | " + " | ".join(
            f"{report['results'][t]['bpb']['bpb']:.4f}" for t in loops) + " |")
    for metric, fit in report.get("fit", {}).items():
        if fit.get("underdetermined"):
            lines.append(f"\n{metric}: no test-time law fitted ({fit['reason']})")
        elif "S_inf" in fit:
            lines.append(f"\n{metric}: S(T) = {fit['S_inf']:.3f} − ({fit['S_inf']:.3f} − {fit['S0']:.3f})·"
                         f"exp(−{fit['k']:.3f}·T), rmse {fit['rmse']:.3f}")
    return "\n".join(lines) + "\n"


def _with_spread(value: float, std: float, seeds: list[int]) -> str:
    """``mean ± std`` over seeds; a single seed has no spread to show (not "± 0.00")."""
    return f"{value:.2f} ± {std:.2f}" if len(seeds) > 1 else f"{value:.2f}"


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
            if "S_inf" in fit and not fit["underdetermined"]:
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
