"""tools/ablation/stats.py and the statistics columns of tools/ablate.py's tables: the t interval
of a mean, Welch's t-test against the reference row, Holm's correction, the paper protocol's
inflation. Known values come from t tables, hand computations and scipy.stats.ttest_ind; the
end-to-end test builds the table of hand-written summary.json files with --collect (no training).
"""
import csv
import importlib.util
import json
import math
import os
import statistics

import pytest
import yaml
from scipy import stats as scipy_stats

from conftest import ROOT
from tools.ablation.stats import holm, mean_std, t_interval, welch


def _load_ablate():
    spec = importlib.util.spec_from_file_location("ablate_cli", os.path.join(ROOT, "tools", "ablate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablate = _load_ablate()


def _t_density(x, df):
    return (math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
            * (1 + x * x / df) ** (-(df + 1) / 2))


def _t_mass(x, df, steps=1000):
    """P(0 < T < x) by Simpson's rule: a t distribution that owes nothing to scipy."""
    h = x / steps
    inner = sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, steps))
    return h / 3 * (_t_density(0, df) + inner + _t_density(x, df))


def _t_quantile_975(df):
    low, high = 0.0, 50.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_mass(mid, df) < 0.475 else (low, mid)
    return (low + high) / 2


# ------------------------------------------------------------------------------ interval
@pytest.mark.parametrize("values, t_table", [
    ([1.0, 2.0, 3.0], 4.303),  # t(0.975, 2) from a printed t table
    ([float(v) for v in range(10)], 2.262),  # t(0.975, 9)
])
def test_t_interval_is_mean_plus_minus_t_times_the_standard_error(values, t_table):
    """Catches: z instead of t quantile (1.960), sd instead of standard error (no / sqrt(n)),
    n instead of n - 1 degrees of freedom (t(0.975, 3) = 3.182, t(0.975, 10) = 2.228)."""
    mean, sd = statistics.mean(values), statistics.stdev(values)
    low, high = t_interval(values)
    half = t_table * sd / math.sqrt(len(values))
    assert (low + high) / 2 == pytest.approx(mean, abs=1e-12)
    assert (high - low) / 2 == pytest.approx(half, abs=5e-4 * sd)  # the table's 3 decimals


def test_t_interval_with_one_seed_or_no_spread():
    """Catches: an interval (or a crash) from a single seed, and a rounding residue that gives
    equal values a nonzero spread."""
    assert t_interval([0.3]) is None and t_interval([]) is None
    assert mean_std([0.1, 0.1, 0.1]) == (0.1, 0.0)
    assert t_interval([0.1, 0.1, 0.1]) == (0.1, 0.1)


# ------------------------------------------------------------------------------ Welch
def test_welch_by_hand():
    """a = 1 2 3 (mean 2, var 1), b = 4 6 8 10 (mean 7, var 20/3): se^2 = 1/3 + 5/3 = 2,
    t = -5 / sqrt(2), Welch-Satterthwaite df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 216/53;
    p and the interval from a t distribution integrated here. Catches: pooled instead of Welch
    df (5), pooled variance in the standard error (t = -3.12), a one-sided p, b - a instead of
    a - b, z instead of t quantile in the difference's interval."""
    result = welch([1, 2, 3], [4, 6, 8, 10])
    assert result.diff == -5
    assert result.t == pytest.approx(-5 / math.sqrt(2), rel=1e-12)
    assert result.df == pytest.approx(216 / 53, rel=1e-12)
    p = 2 * (0.5 - _t_mass(5 / math.sqrt(2), 216 / 53))
    assert result.p == pytest.approx(p, rel=1e-6)
    half = _t_quantile_975(216 / 53) * math.sqrt(2)
    assert (result.low, result.high) == pytest.approx((-5 - half, -5 + half), rel=1e-6)


@pytest.mark.parametrize("a, b", [
    ([0.21, 0.25, 0.22], [0.30, 0.26, 0.35]),
    ([0.5, 0.52, 0.49, 0.55, 0.51], [0.47, 0.56]),
    ([12.0, 15.5, 11.2, 14.1], [13.0, 13.1, 12.9]),
])
def test_welch_agrees_with_scipy(a, b):
    """Catches any departure from scipy.stats.ttest_ind(equal_var=False): statistic, df,
    p-value and the 95 % interval of the difference; and numpy scalars leaking into results.csv
    (written as 'np.float64(...)')."""
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    result = welch(a, b)
    assert all(type(v) is float for v in (result.t, result.df, result.p, result.low, result.high))
    assert result.t == pytest.approx(ref.statistic, rel=1e-9)
    assert result.df == pytest.approx(ref.df, rel=1e-9)
    assert result.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_welch_with_constant_rows_and_single_seeds():
    """Catches: division by zero for rows without spread, a p-value for a tie of constants, a
    test made with a single seed, and the df of a one-sided-constant pair (n - 1 of the other)."""
    apart = welch([0.3, 0.3, 0.3], [0.2, 0.2])
    assert (apart.diff, apart.low, apart.high, apart.p) == pytest.approx((0.1, 0.1, 0.1, 0.0))
    tie = welch([0.3, 0.3], [0.3, 0.3, 0.3])
    assert tie.diff == 0 and tie.p is None and (tie.low, tie.high) == (0, 0)
    one_constant = welch([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])  # t = -2 / sqrt(1/3), df = 3 - 1
    t = 2 / math.sqrt(1 / 3)
    assert one_constant.df == pytest.approx(2.0)
    assert one_constant.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)  # closed form, df 2
    assert welch([0.3], [0.2, 0.25]) is None and welch([0.2, 0.25], [0.3]) is None


# ------------------------------------------------------------------------------ Holm
def test_holm_on_known_pvalues():
    """Sorted 0.005 0.01 0.03 0.04 times 4 3 2 1 = 0.02 0.03 0.06 0.04; step-down keeps the
    running maximum, so 0.04 -> 0.06. Catches: Holm not monotone (0.04 kept), Bonferroni instead
    of Holm (0.01 -> 0.04), no cap at 1, undefined p-values counted in the family."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([None, 0.02, 0.04]) == [None, pytest.approx(0.04), pytest.approx(0.04)]
    assert holm([0.2]) == [0.2] and holm([]) == []


# ------------------------------------------------------------------------------ the tool
MAP = {"baseline": [0.20, 0.22, 0.21], "plus_a": [0.25, 0.28, 0.26], "plus_b": [0.205, 0.215, 0.23],
       "single": [0.30]}
# Per seed: the best test epoch's metrics minus the last epoch's (the paper protocol's inflation).
GAIN = {"baseline": [0.01, 0.03, 0.02], "plus_a": [0.0, 0.01, 0.05], "plus_b": [0.02, 0.02, 0.02],
        "single": [0.04]}


def _summary(m_ap, gain):
    last = {"mAP": m_ap, "R1": 1.5 * m_ap + 0.05, "R5": m_ap + 0.2, "R10": m_ap + 0.3, "mINP": m_ap - 0.1}
    paper = {k: v + gain for k, v in last.items()}
    return {"last": {"epoch": 10, "results": {"test": last}},
            "best": {"epoch": 5, "split": "val", "mAP": 0.1, "metrics": {"test": last}},
            "best_test_paper_protocol": {"epoch": 7, "metrics": paper}, "train_seconds": 5.0}


def _grid(tmp_path, reference="baseline"):
    content = {"base": "configs/Synthetic/quickstart.yml", "seeds": [1, 2, 3],
               "rows": [{"name": name} for name in MAP]}
    if reference is not None:
        content["reference"] = reference
    path = tmp_path / "g.yml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def _fake_runs(grid_path, output):
    """Finished run folders: the tool's stamp and a hand-written summary.json (row 'single'
    finished seed 1 only)."""
    for run in ablate.plan_runs(ablate.load_grid(grid_path), output):
        values = MAP[run.row.name]
        if run.seed > len(values):
            continue
        os.makedirs(run.folder)
        ablate.write_stamp(run, {})
        with open(os.path.join(run.folder, "summary.json"), "w") as f:
            json.dump(_summary(values[run.seed - 1], GAIN[run.row.name][run.seed - 1]), f)


def test_collect_writes_intervals_differences_p_values_and_inflation(tmp_path):
    """Catches: columns missing from results.csv / results.md, values that do not follow the
    summary.json files (interval, Welch difference and p against the reference, Holm over the
    grid's rows, inflation = best test epoch minus last epoch), a row compared with itself, and
    statistics shown for a single seed."""
    grid = _grid(tmp_path)
    output = str(tmp_path / "out")
    _fake_runs(grid, output)
    assert ablate.main(["--grid", grid, "--output", output, "--collect"]) == 0
    with open(os.path.join(output, "results.csv")) as f:
        table = {line["row"]: line for line in csv.DictReader(f)}
    md = (tmp_path / "out" / "results.md").read_text()

    base = MAP["baseline"]
    tests = {row: scipy_stats.ttest_ind(MAP[row], base, equal_var=False) for row in ("plus_a", "plus_b")}
    low_p, high_p = sorted(("plus_a", "plus_b"), key=lambda r: tests[r].pvalue)
    holm_p = {low_p: 2 * tests[low_p].pvalue}
    holm_p[high_p] = max(holm_p[low_p], tests[high_p].pvalue)
    for row in ("baseline", "plus_a", "plus_b"):
        line, values = table[row], MAP[row]
        half = scipy_stats.t.ppf(0.975, 2) * statistics.stdev(values) / math.sqrt(3)
        mean = statistics.mean(values)
        assert float(line["mAP_ci_low"]) == pytest.approx(mean - half, rel=1e-9)
        assert float(line["mAP_ci_high"]) == pytest.approx(mean + half, rel=1e-9)
        inflation = statistics.mean(GAIN[row])
        assert float(line["mAP_inflation"]) == pytest.approx(inflation, rel=1e-9)
        assert float(line["R1_inflation"]) == pytest.approx(inflation, rel=1e-9)
        assert f"| {inflation * 100:+.2f} | {inflation * 100:+.2f} |" in md
        cells = f"| {row} | 3 | {mean * 100:.2f} [{(mean - half) * 100:.2f}, {(mean + half) * 100:.2f}] |"
        if row == "baseline":
            assert line["mAP_diff"] == line["mAP_p"] == line["mAP_p_holm"] == "n/a"
            (md_line,) = [m for m in md.splitlines() if m.startswith(cells)]
            assert md_line.endswith("| reference | - | reference | - |")
            continue
        ref, ci = tests[row], tests[row].confidence_interval(0.95)
        diff = mean - statistics.mean(base)
        assert float(line["mAP_diff"]) == pytest.approx(diff, rel=1e-9)
        assert float(line["mAP_diff_low"]) == pytest.approx(ci.low, rel=1e-9)
        assert float(line["mAP_diff_high"]) == pytest.approx(ci.high, rel=1e-9)
        assert float(line["mAP_p"]) == pytest.approx(ref.pvalue, rel=1e-9)
        assert float(line["mAP_p_holm"]) == pytest.approx(holm_p[row], rel=1e-9)
        delta = f"{diff * 100:+.2f} [{ci.low * 100:+.2f}, {ci.high * 100:+.2f}]"
        p_cell = "< 0.001" if holm_p[row] < 0.001 else f"{holm_p[row]:.3f}"
        assert f"| {delta} | {p_cell} |" in md
    assert holm_p["plus_a"] != tests["plus_a"].pvalue  # the family of 2 changed the p-value

    single = table["single"]  # one finished seed: no interval, no test
    assert single["seeds"] == "1" and single["mAP_ci_low"] == single["mAP_p"] == "n/a"
    assert "| single | 1 | - | - | - | - | - | - |" in md
    assert "Δ mAP vs baseline [95 % CI] | p (Holm)" in md and "inflation mAP" in md
    assert float(single["mAP_inflation"]) == pytest.approx(0.04) and "| +4.00 | +4.00 |" in md


def test_without_a_reference_the_table_has_intervals_only(tmp_path):
    """Catches: difference columns (or a crash) in a grid that names no reference row."""
    grid = _grid(tmp_path, reference=None)
    output = str(tmp_path / "out")
    _fake_runs(grid, output)
    assert ablate.main(["--grid", grid, "--output", output, "--collect"]) == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "mAP [95 % CI]" in md and "Δ" not in md
    with open(os.path.join(output, "results.csv")) as f:
        assert {line["mAP_diff"] for line in csv.DictReader(f)} == {"n/a"}


def test_a_reference_that_names_no_row_is_one_clear_error(tmp_path, capsys):
    """Catches: a KeyError traceback at the end of a grid, or a table silently without the
    comparison, when `reference:` names no row (checked before anything runs)."""
    grid = _grid(tmp_path, reference="basline")
    assert ablate.main(["--grid", grid, "--output", str(tmp_path / "out"), "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert grid in err and "reference:" in err and "'basline'" in err and "baseline" in err
    assert not (tmp_path / "out").exists()


def test_shipped_grids_name_an_existing_reference_row():
    """Catches: a shipped grid whose baseline row was renamed away from its `reference:` (the
    grid would stop with an error), and a grid with a baseline row but no reference."""
    folder = os.path.join(ROOT, "configs", "ablations")
    for name in sorted(os.listdir(folder)):
        grid = ablate.load_grid(os.path.join(folder, name))
        baselines = [row.name for row in grid.rows if "baseline" in row.name]
        if baselines:
            assert grid.reference == baselines[0], name
