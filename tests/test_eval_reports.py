"""What `parcae eval` and `parcae compare` print must not mislead: a law only where the points determine one, no
spread for a single seed, and a warning whenever two reports were made under different settings."""

import json

import pytest

from modeling_parcae.eval.aggregate import fit_saturating, markdown_table

# held-out loss of the bundled demo at 1..8 loops (README): a real saturation
DEMO_LOSS = [4.8278, 4.7124, 4.6882, 4.6805, 4.6776, 4.6764, 4.6759, 4.6757]


def test_a_saturating_curve_is_a_law():
    fit = fit_saturating(list(range(1, 9)), DEMO_LOSS)
    assert fit["underdetermined"] is False and "reason" not in fit
    assert fit["S_inf"] == pytest.approx(4.676, abs=2e-3) and 1.0 < fit["k"] < 2.0


@pytest.mark.parametrize("loops, scores, why", [
    ([1, 2], [-6.6, -7.0], "fewer than 3 loop depths"),
    ([1, 2, 4, 8], [-6.665, -7.0, -7.67, -9.01], "no saturation"),  # a straight line: S_inf runs off to -infinity
    ([1, 2, 4], [3.0, 3.0, 3.0], "do not change"),
])
def test_fits_the_points_do_not_determine_are_flagged_with_the_reason(loops, scores, why):
    fit = fit_saturating(loops, scores)
    assert fit["underdetermined"] is True
    assert why in fit["reason"]


def _report(seeds, fit):
    return {"model": "m", "baselines": "v1", "seeds": seeds, "limit": 5, "fit": {"core": fit},
            "results": {"1": {"tasks": {"copa": {"acc": 0.6, "acc_std": 0.0, "centered": 0.2}},
                              "core": 20.0, "core_std": 0.0, "core_tasks": 1}}}


def test_the_table_prints_no_law_for_an_undetermined_fit_and_no_spread_for_one_seed():
    nonsense = fit_saturating([1, 2, 4, 8], [-6.665, -7.0, -7.67, -9.01])
    table = markdown_table(_report([1234], nonsense))
    assert "S(T) =" not in table and "core: no test-time law fitted (" in table
    assert "±" not in table and "| copa | 60.00 |" in table and "**20.00**" in table
    two_seeds = markdown_table(_report([1234, 2345], fit_saturating(list(range(1, 9)), DEMO_LOSS)))
    assert "60.00 ± 0.00" in two_seeds and "core: S(T) = 4.67" in two_seeds


def _write(path, *, tasks: dict, limit, seeds, core):
    path.write_text(json.dumps({
        "model": path.stem, "baselines": "v1", "seeds": seeds, "limit": limit,
        "results": {"4": {"tasks": {label: {"acc": acc, "acc_std": 0.0, "centered": 2 * acc - 1}
                                    for label, acc in tasks.items()},
                          "core": core, "core_std": 0.0, "core_tasks": len(tasks)}}}))
    return path


def test_compare_warns_when_limits_seeds_or_task_sets_differ_and_compares_core_over_common_tasks(tmp_path, capsys):
    from modeling_parcae.cli import main

    a = _write(tmp_path / "a.json", tasks={"copa": 0.5, "piqa": 0.6, "boolq": 0.7}, limit=5, seeds=[1234], core=20.0)
    b = _write(tmp_path / "b.json", tasks={"copa": 0.6, "piqa": 0.7}, limit=3, seeds=[1234, 2345], core=60.0)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "warning: different --limit (A: 5, B: 3)" in out
    assert "warning: different few-shot seeds (A: [1234], B: [1234, 2345])" in out
    assert "warning: different task sets (3 tasks in A, 2 in B, 2 in both)" in out
    core = next(line for line in out.splitlines() if line.startswith("CORE"))
    # over copa and piqa: A = 100·mean(0.0, 0.2) = 10, B = 100·mean(0.2, 0.4) = 30; never the reports' 20 vs 60
    assert core.split()[-3:] == ["10.00", "30.00", "+20.00"] and "2 common tasks" in core


def test_compare_of_reports_made_alike_has_no_warning(tmp_path, capsys):
    from modeling_parcae.cli import main

    a = _write(tmp_path / "a.json", tasks={"copa": 0.5}, limit=5, seeds=[1234], core=0.0)
    b = _write(tmp_path / "b.json", tasks={"copa": 0.6}, limit=5, seeds=[1234], core=20.0)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    assert next(line for line in out.splitlines() if line.startswith("CORE")).split()[1:] == ["0.00", "20.00", "+20.00"]


def test_a_bits_per_byte_only_report_names_no_centering_baselines_nor_seeds(tmp_path, capsys):
    """Issue 36: `parcae eval --tasks bpb` headed its table 'baselines v1, seeds [1234, 2345, 3456]', settings of the
    CORE tasks it never ran."""
    from modeling_parcae import demo_model_path
    from modeling_parcae.cli import main

    output = tmp_path / "demo.json"
    assert main(["eval", "--model", "demo", "--tasks", "bpb", "--text", str(demo_model_path() / "heldout.txt"),
                 "--limit", "2", "--num-loops", "1", "--output", str(output)]) == 0
    title, _, head = output.with_suffix(".md").read_text().splitlines()[:3]
    assert title.startswith("# demo — ") and "baselines" not in title and "seed" not in title
    assert head == "| metric | T=1 |"
    assert "| bits per byte |" in output.with_suffix(".md").read_text()
