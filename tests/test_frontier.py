"""The verbatim-recall frontier, capacity at the frontier, the verbatim what-if, and the regime of a sweep."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from memcore.config import MemcoreError
from memcore.frontier import (
    fit_frontier,
    frontier_difference,
    frontier_from_table,
    interpolated_frontier,
    recall_count_inside,
    smallest_verbatim_rank,
)
from memcore.law import law_points, regime

RANKS = [1, 2, 4, 8, 16]
LENGTHS = [8, 16, 32, 64, 128, 256, 512]


def _synthetic(a=math.log(20), gamma=0.8, k=3.0, seeds=6, seed=0):
    """Recall drawn from P = σ(k (a + γ ln r − ln ℓ)), i.e. a known frontier ℓ*(r) = e^a r^γ."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in RANKS:
        for ell in LENGTHS:
            p = 1 / (1 + math.exp(-k * (a + gamma * math.log(r) - math.log(ell))))
            for s in range(seeds):
                rows.append({"rank": r, "length": ell, "seed": s, "exact_recall": bool(rng.random() < p),
                             "p_eff": 1152 * r, "bits_per_param": 20.0 * ell / (1152 * r), "method": "sft"})
    return pd.DataFrame(rows)


def test_the_likelihoods_gradient_is_its_derivative():
    """The frontier's optimizer is given this gradient instead of differencing the likelihood numerically."""
    from memcore.frontier import _neg_log_lik

    df = _synthetic()
    lr, ll = np.log(df["rank"].to_numpy(float)), np.log(df["length"].to_numpy(float))
    y = df["exact_recall"].to_numpy(float)
    for theta in (np.array([3.0, 0.8, 3.0]), np.array([2.0, 1.4, 0.3]), np.array([4.5, 0.2, 40.0])):
        _, grad = _neg_log_lik(theta, lr, ll, y)
        for i in range(3):
            h = np.eye(3)[i] * 1e-6
            numeric = (_neg_log_lik(theta + h, lr, ll, y)[0] - _neg_log_lik(theta - h, lr, ll, y)[0]) / 2e-6
            assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-4), (theta, i)


@pytest.mark.parametrize("k", [0.5, 3.0, 40.0])
def test_the_batched_bootstrap_fits_reach_each_resamples_own_optimum(k):
    """The bootstrap fits every resample at once (Newton in the concave parametrization); each must be the
    maximum-likelihood fit of its resample: a likelihood at least as high as a one-at-a-time L-BFGS-B fit's,
    at the same place where the optimum is graded (k = 0.5, 3), and for a perfectly separated frontier (k at its
    bound), a place just as good. A resample whose optimum runs off toward γ's bound (here: one rank all recalled,
    the other never, so any steeper line is better) is handed to the one-at-a-time fit and gets its answer."""
    from memcore.frontier import _mle, _mle_many, _neg_log_lik

    df = _synthetic(k=k, seeds=3, seed=2)
    lr, ll = np.log(df["rank"].to_numpy(float)), np.log(df["length"].to_numpy(float))
    y = df["exact_recall"].to_numpy(float)
    start = _mle(lr, ll, y, np.array([3.0, 1.0, 5.0]))
    rng = np.random.default_rng(0)
    counts = np.array([np.bincount(rng.integers(0, len(y), len(y)), minlength=len(y)) for _ in range(40)])
    batched = _mle_many(lr, ll, y, counts, start)
    for c, theta in zip(counts, batched):
        rows = np.repeat(np.arange(len(y)), c)
        alone = _mle(lr[rows], ll[rows], y[rows], start)
        assert (_neg_log_lik(theta, lr[rows], ll[rows], y[rows])[0]
                <= _neg_log_lik(alone, lr[rows], ll[rows], y[rows])[0] + 1e-6)
        if k < 10:
            assert theta == pytest.approx(alone, abs=2e-3)
    lr2, ll2, y2 = np.log([1.0, 1, 2, 2]), np.log([10.0, 20, 10, 20]), np.array([0.0, 0, 1, 1])
    theta = _mle_many(lr2, ll2, y2, np.ones((1, 4)), np.array([2.5, 1.0, 5.0]))[0]
    assert theta == pytest.approx(_mle(lr2, ll2, y2, np.array([2.5, 1.0, 5.0])), rel=1e-9)  # handed over


def test_a_bootstrap_resample_keeps_every_ranks_points_and_has_a_frontier_to_fit():
    """Resamples are drawn within each rank, so each keeps the design (as many points per rank as measured), the
    same seed draws the same resamples, and a resample with every point recalled, or none, is dropped."""
    from memcore.frontier import _bootstrap_counts

    r = np.array([1.0, 1, 1, 2, 2])
    y = np.array([1.0, 0, 0, 1, 0])
    counts = _bootstrap_counts(r, y, 200, seed=5)
    assert counts.shape[1] == len(y) and 150 < len(counts) < 200  # about 1 in 13 draws no recalled point
    assert (counts[:, :3].sum(1) == 3).all() and (counts[:, 3:].sum(1) == 2).all()
    drawn = counts > 0
    assert (drawn & (y > 0)).any(1).all() and (drawn & (y == 0)).any(1).all()
    assert (counts == _bootstrap_counts(r, y, 200, seed=5)).all()
    assert _bootstrap_counts(r, np.ones(5), 50, seed=5).shape == (0, 5)


def test_fit_recovers_a_known_frontier():
    df = _synthetic()
    fit = fit_frontier(df["rank"], df["length"], df["exact_recall"])
    assert fit.gamma_interval[0] < 0.8 < fit.gamma_interval[1]
    assert fit.a_interval[0] < math.log(20) < fit.a_interval[1]
    assert abs(fit.gamma - 0.8) < 0.15 and abs(fit.a - math.log(20)) < 0.3
    lo, hi = fit.ell_star_interval(4)
    assert lo < 20 * 4**0.8 < hi


def test_a_sharp_frontier_is_located_between_the_measured_lengths():
    rows = [{"rank": r, "length": ell, "exact_recall": ell <= 16 * r} for r in RANKS for ell in LENGTHS]
    df = pd.DataFrame(rows)
    fit = fit_frontier(df["rank"], df["length"], df["exact_recall"])
    for r in RANKS:
        last_ok = max(ell for ell in LENGTHS if ell <= 16 * r)
        assert last_ok <= fit.ell_star(r) <= 2 * last_ok  # between the last recalled length and the next
    assert fit.notes and "perfectly separated" in fit.notes[0]
    # the what-if follows the measured points: rank 2 recalled 32 tokens, rank 1 did not
    ans = smallest_verbatim_rank(fit, 32)
    assert ans.rank == 2 and ans.interval == (2, 2) and not ans.extrapolated
    assert smallest_verbatim_rank(fit, 16).rank == 1 and smallest_verbatim_rank(fit, 16).notes == []
    per_rank = interpolated_frontier(df)
    assert [p.ell_star for p in per_rank] == pytest.approx([16 * math.sqrt(2) * r for r in RANKS], rel=1e-6)
    wide = pd.concat([df, pd.DataFrame([{"rank": 64, "length": ell, "exact_recall": True} for ell in LENGTHS])])
    top = interpolated_frontier(wide)[-1]
    assert top.bound == "at least" and top.ell_star == 512  # rank 64 recalls every length: only a bound


def test_interpolation_uses_the_recall_rate_across_seeds():
    df = pd.DataFrame([{"rank": 2, "length": 32, "exact_recall": True}] * 2
                      + [{"rank": 2, "length": 64, "exact_recall": x} for x in (True, False, False, False)])
    (p,) = interpolated_frontier(df)
    # rate 1.0 at 32, 0.25 at 64: crosses 1/2 two thirds of the way from 32 to 64 in log length
    assert p.ell_star == pytest.approx(32 * 2 ** (2 / 3)) and p.bound == "interpolated"
    assert p.recall_rate == {32: 1.0, 64: 0.25}


def test_bits_per_param_at_the_frontier():
    df = _synthetic(k=50.0)
    per_rank, fit, why = frontier_from_table(df)
    assert why is None and fit.bits_per_token == pytest.approx(20.0)
    assert fit.p_eff_per_rank == 1152
    assert fit.bits_per_param(4) == pytest.approx(float(fit.ell_star(4)) * 20.0 / (4 * 1152))


def test_verbatim_rank_and_its_interval():
    fit = fit_frontier(*(_synthetic()[c] for c in ("rank", "length", "exact_recall")))
    ans = smallest_verbatim_rank(fit, 100)
    assert ans.rank == math.ceil(fit.rank_for(100)) and fit.ell_star(ans.rank) >= 100 > fit.ell_star(ans.rank - 1)
    assert ans.interval[0] <= ans.rank <= ans.interval[1] and not ans.extrapolated and ans.notes == []


def test_verbatim_what_if_never_extrapolates_silently():
    fit = fit_frontier(*(_synthetic()[c] for c in ("rank", "length", "exact_recall")))
    far = smallest_verbatim_rank(fit, 5000)
    assert far.extrapolated and any("outside the measured lengths 8-512" in n for n in far.notes)
    assert any("outside the measured ranks 1-16" in n for n in far.notes)


def test_frontier_outside_the_grid_is_said():
    df = pd.DataFrame([{"rank": r, "length": ell, "exact_recall": True} for r in (1, 2) for ell in (8, 16)])
    with pytest.raises(MemcoreError, match=r"every point was recalled .* \(longer targets"):
        fit_frontier(df["rank"], df["length"], df["exact_recall"])
    with pytest.raises(MemcoreError, match="no exact_recall"):
        interpolated_frontier(df.drop(columns=["exact_recall"]))


def test_cli_frontier_and_predict_verbatim(tmp_path, capsys):
    from memcore.cli import main

    f = tmp_path / "sweep.csv"
    _synthetic().to_csv(f, index=False)
    assert main(["predict", "--csv", str(f), "--length", "100", "--verbatim", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (isinstance(out["rank"], int) and len(out["interval"]) == 2
            and out["interval"][0] <= out["rank"] <= out["interval"][1])
    assert main(["predict", "--csv", str(f), "--length", "3000", "--verbatim"]) == 0
    cap = capsys.readouterr()
    assert "[extrapolated]" in cap.out and "outside the measured lengths" in cap.err
    assert main(["frontier", "--csv", str(f)]) == 0
    text = capsys.readouterr().out
    assert "fitted frontier ℓ*(r) =" in text and "bits/param" in text and "rank 16" in text
    old = tmp_path / "old.csv"
    _synthetic().drop(columns=["exact_recall"]).assign(delta_loss=1.0).to_csv(old, index=False)
    assert main(["predict", "--csv", str(old), "--length", "10", "--verbatim"]) == 2
    assert "no exact_recall" in capsys.readouterr().err


def test_regime_is_read_from_how_points_stopped():
    df = pd.DataFrame({"stop_reason": ["plateau"] * 6 + ["all_above_tau"] * 2 + ["max_steps"] * 2,
                       "frac_above": [0.5] * 6 + [1.0] * 2 + [0.2] * 2})
    reg = regime(df)
    assert (reg.converged, reg.saturated, reg.budget_bound) == (6, 2, 2) and reg.label == "capacity-bound (converged)"
    sub, how = law_points(df.assign(rank=1, length=1, delta_loss=1.0))
    assert len(sub) == 6 and "converged, unsaturated" in how
    # a fixed-budget table (no stop columns) with nothing saturated is budget-bound, never "capacity-bound"
    old = pd.DataFrame({"frac_above": [0.2] * 10})
    reg = regime(old)
    assert reg.label == "budget-bound (optimization)" and not reg.known and "fixed-budget" in reg.describe()


def test_recall_cells_are_seed_means_per_cell():
    from memcore.frontier import has_recall, recall_cells

    df = pd.DataFrame({"rank": [1, 1, 1, 2], "length": [8, 8, 16, 8], "delta_loss": [1.0, 2.0, 0.5, 3.0],
                       "recalled": [True, False, False, True], "frac_correct": [1.0, 0.5, 0.25, 1.0]})
    cells = recall_cells(df)  # an older table: recalled and frac_correct stand in for exact_recall, token_accuracy
    assert cells[["rank", "length"]].values.tolist() == [[1, 8], [1, 16], [2, 8]]
    assert cells["delta_loss"].tolist() == [1.5, 0.5, 3.0] and cells["exact_recall"].tolist() == [0.5, 0.0, 1.0]
    assert cells["token_accuracy"].tolist() == [0.75, 0.25, 1.0]
    words = df.assign(recalled=["True", "False", "false", "yes"])  # a spreadsheet's words: "False" is not recalled
    assert recall_cells(words)["exact_recall"].tolist() == [0.5, 0.0, 1.0]
    bare = df.drop(columns=["recalled", "frac_correct"])
    assert has_recall(df) and not has_recall(bare)
    with pytest.raises(MemcoreError, match="no exact_recall"):
        recall_cells(bare)


def test_runs_stopped_when_recalled_count_as_saturated_not_budget_bound():
    from memcore.law import point_states, regime

    df = pd.DataFrame({"stop_reason": ["recalled", "recalled", "max_steps", "plateau"], "frac_above": [0.9] * 4})
    states, known = point_states(df)
    assert known and states.tolist() == ["saturated", "saturated", "budget", "converged"]
    assert regime(df).label == "mixed" and "50% saturated (every token above τ or recalled)" in regime(df).describe()


# --- paired differences ------------------------------------------------------------------------------------


def _paired_table(diff, seeds, rng, spread=5.0, noise=1.0):
    """sft and memft-ot on the same seeds: a shared per-seed level (large), memft-ot = sft + diff + noise."""
    rows = []
    for s in range(seeds):
        level = rng.normal(50, spread)
        rows.append({"method": "sft", "rank": 1, "length": 40, "seed": s, "token_accuracy": level,
                     "steps": level, "exact_recall": False})
        rows.append({"method": "memft-ot", "rank": 1, "length": 40, "seed": s,
                     "token_accuracy": level + diff + rng.normal(0, noise),
                     "steps": level + diff + rng.normal(0, noise),
                     "exact_recall": s % 2 == 0})
    return pd.DataFrame(rows)


def test_paired_interval_covers_a_known_difference_at_its_level():
    from memcore.frontier import paired_differences

    rng = np.random.default_rng(0)
    hits, sims = 0, 400
    for _ in range(sims):
        t = paired_differences(_paired_table(2.0, 5, rng), ["token_accuracy"])
        hits += bool(t["lo"].iloc[0] <= 2.0 <= t["hi"].iloc[0])
    assert 0.92 <= hits / sims <= 0.98  # a 95% interval: wrong quantiles or a wrong sd would miss this band


def test_paired_differences_pair_by_seed_and_say_who_wins():
    from memcore.frontier import paired_differences

    rng = np.random.default_rng(1)
    df = _paired_table(2.0, 8, rng, spread=20.0, noise=0.5)
    t = paired_differences(df, ["token_accuracy", "steps", "exact_recall"]).set_index("measure")
    acc = t.loc["token_accuracy"]
    # the seeds' shared level (sd 20) cancels in the pairs: the interval is about the noise (sd 0.5), not the level
    assert acc["n"] == 8 and acc["lo"] > 1.0 and acc["hi"] < 3.0 and acc["verdict"] == "wins"
    assert t.loc["steps", "verdict"] == "loses"  # more steps is worse
    assert t.loc["exact_recall", "mean"] == pytest.approx(0.5)  # read as 0/1: half the seeds recalled
    one = paired_differences(df[df["seed"] == 0], ["token_accuracy"])
    assert one["verdict"].iloc[0] == "one seed" and np.isnan(one["lo"].iloc[0])
    # a seed only one method has is left out of the pairs
    assert paired_differences(df[~((df["seed"] == 7) & (df["method"] == "sft"))],
                              ["token_accuracy"])["n"].iloc[0] == 7
    with pytest.raises(MemcoreError, match="no sft rows"):
        paired_differences(df[df["method"] != "sft"], ["steps"])
    with pytest.raises(MemcoreError, match="lacks the column"):
        paired_differences(df.drop(columns=["seed"]), ["steps"])


def test_what_points_gained_after_a_plateau_stop_is_read_per_method_over_the_ones_held():
    from memcore.frontier import gained_after_stop, gained_words

    checked = pd.DataFrame({
        "method": ["sft", "memft-ot", "memft-ot", "memft-ot"], "recalled": [False, False, False, True],
        "delta_loss": [10.1, 12.0, 13.0, 99.0], "stop_delta_loss": [10.0, 10.0, 12.5, 1.0],
        "token_accuracy": [0.9, 0.95, 0.99, 1.0], "stop_token_accuracy": [0.9, 0.9, 0.9, 0.1],
        "frac_above": [0.5, 0.625, 0.5, 1.0], "stop_frac_above": [0.5, 0.3125, 0.4, 0.0]})
    g = gained_after_stop(checked).set_index("method")
    assert g.loc["memft-ot", "held"] == 2  # the recalled one is no fidelity past the frontier
    assert g.loc["memft-ot", ["dl_pct_min", "dl_pct_max"]].tolist() == pytest.approx([4.0, 20.0])
    assert g.loc["memft-ot", ["acc_pts_min", "acc_pts_max"]].tolist() == pytest.approx([5.0, 9.0])
    assert g.loc["memft-ot", ["above_pts_min", "above_pts_max"]].tolist() == pytest.approx([10.0, 31.25])
    assert g.loc["sft", "dl_pct_max"] == pytest.approx(1.0)
    assert gained_words(gained_after_stop(checked)) == (
        "sft (1 point) ΔL +1.0%, token accuracy +0.0 points, tokens above τ +0.0 points; memft-ot (2 points) ΔL "
        "+4.0 to +20.0%, token accuracy +5.0 to +9.0 points, tokens above τ +10.0 to +31.2 points")
    assert gained_after_stop(checked.drop(columns=["stop_delta_loss"])).empty  # a table from before they were kept


def test_a_window_check_is_tallied_with_an_exact_interval_on_the_share_cut_short():
    from scipy import stats

    from memcore.frontier import window_tally

    checked = pd.DataFrame({"recalled": [True, True, False, False, "false"],
                            "kind": ["cut short", "diverged", "held", "held", "held"]})
    t = window_tally(checked)
    assert (t.recalled, t.n, t.cut) == (2, 5, 1)
    ci = stats.binomtest(1, 5).proportion_ci(0.95, method="exact")
    assert (t.cut_lo, t.cut_hi) == pytest.approx((ci.low, ci.high)) and t.cut_lo < 0.2 < t.cut_hi
    old = window_tally(checked.drop(columns=["kind"]))  # before kinds were kept: nothing counts as cut
    assert old.cut == 0 and list(old.kinds) == ["recalled", "recalled", "held", "held", "held"]
    with pytest.raises(MemcoreError, match="recalled column"):
        window_tally(pd.DataFrame({"kind": ["held"]}))


def test_the_difference_of_two_frontiers_has_an_interval_that_tells_more_from_a_tie():
    """A method whose frontier is twice as far out (ℓ*(r) = 40·r^0.8 against 20·r^0.8) holds more, with an interval
    around the true difference; two draws of the same frontier tie."""
    def fit(a, seed):
        df = _synthetic(a=a, seed=seed, seeds=10)
        return fit_frontier(df["rank"], df["length"], df["exact_recall"], seed=seed)
    base, further, again = fit(math.log(20), 0), fit(math.log(40), 1), fit(math.log(20), 2)
    diff, lo, hi, verdict = frontier_difference(further, base, 4)
    truth = (40 - 20) * 4 ** 0.8
    assert verdict == "more" and lo < truth < hi and 0 < lo
    assert diff == pytest.approx(float(further.ell_star(4) - base.ell_star(4)))
    assert frontier_difference(base, further, 4)[3] == "fewer"
    assert frontier_difference(again, base, 4)[3] == "tie"


def test_the_fitted_recall_probability_is_a_half_at_the_frontier_and_its_band_holds_the_truth():
    """P(recalled) on the fitted curve: 1/2 at ℓ*(r) by definition, near 1 far below and near 0 far above; the
    bootstrap band at a length near the frontier holds the true probability of the curve that drew the data."""
    df = _synthetic(seeds=10)
    fit = fit_frontier(df["rank"], df["length"], df["exact_recall"])
    p, lo, hi = fit.recall_probability(4, float(fit.ell_star(4)))
    assert p == pytest.approx(0.5) and lo < 0.5 < hi
    assert fit.recall_probability(4, 8)[0] > 0.95 and fit.recall_probability(4, 512)[0] < 0.05
    truth = 1 / (1 + math.exp(-3.0 * (math.log(20) + 0.8 * math.log(4) - math.log(64))))
    _, lo, hi = fit.recall_probability(4, 64)
    assert lo < truth < hi


def test_a_recall_count_is_inside_a_band_when_its_exact_interval_meets_it():
    assert recall_count_inside(8, 10, 0.7, 0.95)
    assert not recall_count_inside(0, 10, 0.7, 0.95)  # 0 of 10: at most 0.31 at 95%
    assert not recall_count_inside(2, 2, 0.0, 0.1)  # 2 of 2: at least 0.16
    assert recall_count_inside(1, 2, 0.0, 0.1)  # 1 of 2 is a plausible draw at 0.1
    for bad in ((3, 2), (-1, 2), (0, 0)):
        with pytest.raises(MemcoreError, match="not a count of runs"):
            recall_count_inside(*bad, 0.2, 0.8)
