"""What the benchmarks' reports tell a reader (bench/bench_memft.py, shared by bench_phonebook.py): which points
ran out of their budget, whether the plateau rule cut a curve short, an end's rate over fewer seeds so far, and
how much is still to go."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str = "bench_memft"):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Steps:
    """A store whose runs' step rows are given: run id -> [(step, n_above, n_correct)]."""

    def __init__(self, curves):
        self.curves = curves

    def steps(self, rid):
        return [SimpleNamespace(step=s, n_above=a, n_correct=c) for s, a, c in self.curves[rid]]


def test_the_plateau_check_counts_budget_stops_and_curves_the_window_would_have_cut():
    bench = _bench()
    flat_then_up = [(0, 1, 1), (10, 2, 2), (300, 3, 3)]  # 290 steps without a new best, then one
    steady = [(s, s, s) for s in range(0, 100, 10)]
    slow = [(0, 1, 1), (150, 2, 2), (160, 2, 2)]  # a 150-step wait on a point that never recalled
    store = _Steps({"a": flat_then_up, "b": steady, "c": steady, "d": steady, "e": slow})
    df = pd.DataFrame([
        {"run_id": "a", "method": "sft", "exact_recall": True, "stop_reason": "recalled"},
        {"run_id": "b", "method": "sft", "exact_recall": False, "stop_reason": "max_steps"},
        {"run_id": "c", "method": "sft", "exact_recall": False, "stop_reason": "plateau"},
        {"run_id": "d", "method": "memft-ot", "exact_recall": True, "stop_reason": "recalled"},
        {"run_id": "e", "method": "memft-ot", "exact_recall": False, "stop_reason": "max_steps"},
    ])
    rule = bench.plateau_rule_check(store, df, window=200).set_index("method")
    assert rule.loc["sft", "points"] == 2 and rule.loc["sft", "longest_wait"] == 290
    assert rule.loc["sft", "cut_short"] == 1  # a 200-step window would have stopped 'a' before its gain
    assert rule.loc["sft", "longest_before_recall"] == 290  # 'a' recalled after its long wait; 'b' did not
    assert rule.loc["sft", "over_half"] == 1 and rule.loc["sft", "median_longest"] == (290 + 10) / 2
    assert rule.loc["sft", "plateau_stops"] == 1
    assert (rule.loc["sft", "failed"], rule.loc["sft", "budget_stops"]) == (2, 1)
    assert (rule.loc["memft-ot", "failed"], rule.loc["memft-ot", "cut_short"]) == (1, 0)
    assert (rule.loc["memft-ot", "longest_wait"], rule.loc["memft-ot", "longest_before_recall"]) == (150, 10)
    assert rule.loc["memft-ot", "over_half"] == 1


def test_where_stage_two_points_stood_at_the_budget_plateau_or_still_improving():
    """A point past the frontier trained to the budget is on a plateau when it has gone the rule's window without a
    new best; its ΔL over the last window steps says how much it was still gaining (read on decimated rows)."""
    from memcore.frontier import end_of_budget, end_of_budget_words

    class Rows:
        curves = {"flat": [(0, 1, 1, 0.0), (500, 9, 9, 5.0), (1500, 9, 9, 5.2), (2000, 9, 9, 5.25)],
                  "rising": [(0, 1, 1, 0.0), (1000, 5, 5, 4.0), (1700, 6, 6, 4.5), (2000, 7, 7, 4.9)]}

        def steps(self, rid):
            return [SimpleNamespace(step=s, n_above=a, n_correct=c, delta_loss=d) for s, a, c, d in self.curves[rid]]

    ends = end_of_budget(Rows(), ["flat", "rising"], window=200)
    assert ends.loc["flat", "open_wait"] == 1500 and bool(ends.loc["flat", "on_plateau"])
    assert ends.loc["flat", "late_delta_loss"] == pytest.approx(0.05)  # 5.25 − 5.2: the row 200+ steps back
    assert ends.loc["rising", "open_wait"] == 0 and not bool(ends.loc["rising", "on_plateau"])
    assert ends.loc["rising", "late_delta_loss"] == pytest.approx(0.4)  # 4.9 − 4.5
    df = pd.DataFrame({"run_id": ["flat", "rising", "probe"], "method": ["sft", "sft", "sft"],
                       "delta_loss": [5.25, 4.9, 3.0]}).join(ends, on="run_id")
    line, = end_of_budget_words(df, 200)  # the probe (no open_wait) is not one of them
    assert line == ("  sft       1 of 2 points on a plateau at the budget (no new best in tokens above τ or "
                    "argmax-right tokens for 200+ steps; steps since the last best: median 750, least 0); ΔL over "
                    f"the last 200 steps: median +0.2250 nats ({(0.05 / 5.25 + 0.4 / 4.9) / 2:+.1%} of the final ΔL)")


def test_a_bracket_in_words_says_where_an_end_has_fewer_seeds_so_far():
    bench = _bench()
    words = bench.bracket_words(32, 64, 1.0, 0.0, seeds=(3, 2, 3))
    assert words == "ℓ* between 32 and 64 tokens (recalled by 3 of 3 seeds at 32, 0 of 2 seeds so far at 64)"
    assert "so far" not in bench.bracket_words(32, 64, 1.0, 0.0, seeds=(3, 3, 3))
    assert bench.bracket_words(None, None, None, None) == "not probed yet"
    assert bench.bracket_words(None, 1, None, 0.0, "entries", seeds=(0, 2, 2)) == \
        "nothing recalled, not even 1 entry (0 of 2 seeds recalled it)"
    assert bench.bracket_words(8, None, 0.5, None, "entries").startswith("ℓ* ≥ 8 entries (recalled by 50%")


def test_what_is_left_is_costed_by_length_times_steps_at_the_pace_so_far():
    bench = _bench()
    end = SimpleNamespace(method="sft", rank=1, lo=40, hi=50)
    fs = SimpleNamespace(progress=lambda: SimpleNamespace(probes_left=(10, 20)), unsettled=lambda: [end])
    done = pd.DataFrame({"method": ["sft", "sft", "sft"], "rank": [1, 1, 1], "length": [20, 40, 50],
                         "steps": [100, 1000, 1000], "exact_recall": [True, True, False]})
    # 2,000 + 40,000 + 50,000 = 92,000 length-steps in 92,000 s: 1 s each. A probe to come costs what the open
    # bracket's ends cost: 45,000; a point past the frontier its length × 1,000 steps (the one not recalled), one
    # below it its length × 550 steps (the mean of the recalled ones)
    line = bench.to_go(fs, {"wall_s": 92000.0}, done, stage2=[(100, 2.0), (20, 0.5)])
    lo, hi = (10 * 45000 + 100 * 1000 + 20 * 550) / 3600, (20 * 45000 + 100 * 1000 + 20 * 550) / 3600
    assert line == (f"between 10 and 20 probes and 2 points beside them to go (about {lo:.0f}-{hi:.0f} h at this "
                    "search's pace so far: 1000.00 s per 1,000 token-steps on this CPU, a point costing its length × "
                    "its steps)")
    # a long stage-2 point weighs more than a short one, not the same as every point so far
    longer = bench.to_go(fs, {"wall_s": 92000.0}, done, stage2=[(400, 2.0), (20, 0.5)])
    assert f"about {lo + 300 * 1000 / 3600:.0f}-{hi + 300 * 1000 / 3600:.0f} h" in longer
    assert bench.to_go(fs, {}, done) == "between 10 and 20 probes to go"
    # the latest invocations ran at half that pace (12,000 s over 24,000 length-steps): the hours at both
    recent = {"wall_s": 92000.0, "recent": [{"wall_s": 50000.0, "work": 1000.0}, {"wall_s": 6000.0, "work": 12000.0},
                                            {"wall_s": 6000.0, "work": 12000.0}]}
    both = bench.to_go(fs, recent, done, stage2=[(100, 2.0), (20, 0.5)])
    assert both.startswith(f"between 10 and 20 probes and 2 points beside them to go (about {lo / 2:.0f}-{hi / 2:.0f} "
                           "h at the pace of the latest runs, 500.00 s per 1,000 token-steps over their last 3.3 h; "
                           f"about {lo:.0f}-{hi:.0f} h at this search's pace so far")
    assert bench.recent_pace({"recent": [{"wall_s": 600.0, "work": 10.0}]}) is None  # too short to read a pace
    # one short invocation on a shared machine (the last) is read with the ones before it, not alone
    shared = {"recent": [{"wall_s": 6000.0, "work": 12000.0}, {"wall_s": 2000.0, "work": 400.0}]}
    assert bench.recent_pace(shared) is None
    assert bench.recent_pace(shared, least_s=1800.0) == (5.0, 2000.0 / 3600)
    finished = SimpleNamespace(progress=lambda: SimpleNamespace(probes_left=(0, 0)), unsettled=lambda: [])
    assert bench.to_go(finished, {"wall_s": 10.0}, done) == ""
    assert bench.to_go(finished, {"wall_s": 92000.0}, done, stage2=[(50, 1.5)]).startswith(
        "the search's probes done, those points to go (about 14 h at")  # 50 × 1,000 s


def test_stage_two_trains_each_factor_at_every_placed_rank_before_the_next_factor():
    bench = _bench()
    search = SimpleNamespace(methods=("sft",), seeds=(0,))
    brackets = [SimpleNamespace(method="sft", rank=1, lo=40, hi=40), SimpleNamespace(method="sft", rank=2, lo=90,
                                                                                      hi=90)]
    points = bench.around_points(search, brackets, longest=1000)
    assert [(p[1], p[4]) for p in points] == [(1, 0.5), (2, 0.5), (1, 1.5), (2, 1.5), (1, 2.0), (2, 2.0)]
    assert [p[2] for p in points] == [20, 45, 60, 135, 80, 180]
    assert all(p[2] <= 100 for p in bench.around_points(search, brackets, longest=100))


def test_the_search_keeps_its_points_when_one_completes_and_now_and_then_not_at_every_progress(capsys):
    """The Keeper reads the whole sweep each call: the search yields progress every 2 s, and keeping at each cost
    about 3% of the benchmark's time. It is called when a point completes, and otherwise every KEEP_EVERY_S."""
    bench = _bench()

    def progress(done):
        return SimpleNamespace(probes_done=done, also_done=0, also_in_flight=0, in_flight=1, probes_left=(1, 2),
                               steps=10 * done, brackets=[])
    ticks = [progress(d) for d in (0, 0, 0, 1, 1, 1, 1, 2)]
    fs = SimpleNamespace(run=lambda: iter(ticks))
    calls = []
    bench.run_search(fs, 0.0, on_progress=lambda: calls.append(1))
    assert len(calls) == 3  # the first, and the two completions
    assert len(capsys.readouterr().out.splitlines()) == 3  # one line per completion, as before
    bench.KEEP_EVERY_S = 0.0  # now and then: every progress once that much time has gone by
    calls.clear()
    bench.run_search(fs, 0.0, on_progress=lambda: calls.append(1))
    assert len(calls) == len(ticks)


def test_a_length_that_is_both_a_probe_and_a_stage_two_cell_trains_under_both_rules():
    """spot re-runs cells of both kinds; one (method, rank, length, seed) as a search probe (plateau rule) and as a
    stage-2 point (common budget) is two runs, told apart by label, and a run already completed is not trained."""
    bench = _bench()
    args = SimpleNamespace(jsonl=None, adapter="bypass", model=None, max_steps=2000, lr=3e-2, plateau_window=200,
                           ranks=[1], methods=["sft", "memft-ot"], seeds=[3], resolution=0.05)
    search = bench.settings(args)
    around, probe = bench.around_run(search), (lambda point: (search.probe_spec(*point), search.label(*point)))
    items = [(("sft", 1, 72, 3), False), (("sft", 1, 72, 3), True), (("sft", 1, 72, 3), True),
             (("memft-ot", 1, 72, 3), True)]
    todo = bench.runs_to_train(items, lambda item: (around if item[1] else probe)(item[0]), known=set())
    assert [item for item, _, _ in todo] == [(("sft", 1, 72, 3), False), (("sft", 1, 72, 3), True),
                                              (("memft-ot", 1, 72, 3), True)]
    assert [spec.train.until for _, spec, _ in todo] == ["converged", "budget", "budget"]
    assert [bench.is_around(label) for _, _, label in todo] == [False, True, True]
    done = {todo[1][2]}  # the stage-2 run at sft's 72 tokens completed: only the other two are left
    left = bench.runs_to_train(items, lambda item: (around if item[1] else probe)(item[0]), known=done)
    assert [item for item, _, _ in left] == [(("sft", 1, 72, 3), False), (("memft-ot", 1, 72, 3), True)]


def test_the_law_past_the_frontier_is_fitted_on_the_points_not_recalled_and_recovers_known_exponents():
    import numpy as np

    bench = _bench()
    rng = np.random.default_rng(0)
    rows = [{"method": "sft", "rank": r, "length": n, "exact_recall": False, "stop_reason": "plateau",
             "delta_loss": 2.0 * r ** 0.5 * n ** -0.3 + 0.1 + rng.normal(0, 0.002)}
            for r in (1, 2, 4) for n in (64, 96, 128, 192)]
    rows += [{"method": "sft", "rank": r, "length": 32, "exact_recall": True, "stop_reason": "recalled",
              "delta_loss": 9.0} for r in (1, 2, 4)]  # recalled: below the frontier, not the law's points
    rows += [{"method": "memft-ot", "rank": r, "length": n, "exact_recall": False, "stop_reason": "plateau",
              "delta_loss": 1.0} for r in (1, 2) for n in (64, 128)]
    lines, law = bench.law_past_frontier(pd.DataFrame(rows), ("sft", "memft-ot"))
    fit = law.set_index("method").loc["sft"]
    assert fit["points"] == 12 and fit["regime"] == "capacity-bound (converged)"
    assert fit["alpha_lo"] < 0.5 < fit["alpha_hi"] and abs(fit["alpha"] - 0.5) < 0.05
    assert fit["beta_lo"] < 0.3 < fit["beta_hi"] and fit["r2"] > 0.99
    assert fit["alpha_over_beta_lo"] < 0.5 / 0.3 < fit["alpha_over_beta_hi"]  # the lines of equal ΔL: ℓ ∝ r^(α/β)
    assert "α/β 1.6" in lines[0] or "α/β 1.7" in lines[0]
    assert "memft-ot" not in set(law["method"])
    assert lines[1] == ("  memft-ot: 4 points not recalled: too few to fit (need 6 on at least 4 (rank, length) cells, "
                        "2+ ranks and 2+ lengths, not one length per rank)")
    assert "fitted on the 12 converged, unsaturated points" in lines[0]


def test_once_stage_two_has_enough_points_past_the_frontier_the_law_is_fitted_on_them_alone():
    import numpy as np

    bench = _bench()
    rng = np.random.default_rng(1)
    probes = [{"method": m, "rank": r, "length": n, "exact_recall": False, "stop_reason": "plateau", "around": False,
               "delta_loss": 2.0 * r ** 0.5 * n ** -0.3 + 0.1 + rng.normal(0, 0.002)}
              for m in ("sft", "memft-ot", "memft-sw") for r in (1, 2) for n in (50, 55, 60)]
    budget = [{"method": "sft", "rank": r, "length": n, "exact_recall": False, "stop_reason": "max_steps",
               "around": True, "delta_loss": 3.0 * r ** 0.8 * n ** -0.2 + 0.1 + rng.normal(0, 0.002)}
              for r in (1, 2) for n in (72, 96, 150, 200) for _ in (0, 1)]
    budget += [{"method": "memft-ot", "rank": 1, "length": n, "exact_recall": False, "stop_reason": "max_steps",
                "around": True, "delta_loss": 1.0} for n in (72, 96)]  # one rank so far: too few
    # 1.5 × ℓ* at both ranks and nothing else yet: 6 points, but one length per rank (ℓ ∝ r), so α is not told
    # from β there and the probes are fitted instead
    budget += [{"method": "memft-sw", "rank": r, "length": n, "exact_recall": False, "stop_reason": "max_steps",
                "around": True, "delta_loss": 3.0 * r ** 0.8 * n ** -0.2 + rng.normal(0, 0.002)}
               for r, n in ((1, 72), (2, 173)) for _ in (0, 1, 2)]
    lines, law = bench.law_past_frontier(pd.DataFrame(probes + budget), ("sft", "memft-ot", "memft-sw"), budget=2000)
    law = law.set_index("method")
    assert law.loc["sft", "points"] == 16 and abs(law.loc["sft", "alpha"] - 0.8) < 0.1  # the budget points' law
    assert law.loc["sft", "fitted_on"].startswith("stage 2's points past the frontier, every one trained to recall "
                                                  "or the 2000-step budget")
    assert law.loc["memft-ot", "points"] == 6 and abs(law.loc["memft-ot", "alpha"] - 0.5) < 0.1  # the probes'
    assert "the search's failed probes (stage 2's points past the frontier are fewer than 6 so far, or on fewer " \
           "than 4 (rank, length) cells, or one length per rank)" in lines[1]
    assert law.loc["memft-sw", "points"] == 6 and abs(law.loc["memft-sw", "alpha"] - 0.5) < 0.1  # the probes'
    assert "the search's failed probes" in law.loc["memft-sw", "fitted_on"]


def test_the_most_entries_any_book_held_is_read_per_method_and_rank_over_its_seeds():
    bench = _bench("bench_phonebook")
    probes = [("sft", 1, 10, 0, 10), ("sft", 1, 10, 1, 8),  # mean 9 of 10
              ("sft", 1, 11, 0, 3), ("sft", 1, 11, 1, 4),  # a larger book recalling fewer
              ("sft", 1, 16, 0, 9), ("sft", 1, 16, 1, 11),  # mean 10 of 16: the most
              ("sft", 1, 20, 0, 10),  # 10 again on one seed, in a larger book: the smaller one is named
              ("sft", 2, 23, 0, 23), ("memft-ot", 1, 16, 0, 12), ("memft-ot", 1, 16, 1, 13)]
    df = pd.DataFrame(probes, columns=["method", "rank", "entries", "seed", "entries_recalled"])
    most = bench.most_recalled(df)
    assert most[("sft", 1)] == {"most_recalled": 10.0, "most_recalled_book": 16, "most_recalled_seeds": 2}
    assert most[("sft", 2)]["most_recalled"] == 23.0 and most[("memft-ot", 1)]["most_recalled"] == 12.5


def test_memft_against_sft_on_the_phonebook_pairs_the_same_books_and_leaves_out_books_one_method_lacks():
    """memft-ot recalls 2 more entries than sft on every book both trained, give or take one: the paired mean is
    +2 with an interval around it that excludes 0 (a win); a book only one search probed is not paired; the share
    is the entries over the book's size; memft-sw, no better than sft, ties."""
    bench = _bench("bench_phonebook")
    rows, noise = [], [0.5, -0.5, 1.0, -1.0, 0.0, 0.5, -0.5, 0.0]
    for i, (n, seed) in enumerate([(8, 0), (8, 1), (16, 0), (16, 1), (24, 0), (24, 1), (32, 0), (32, 1)]):
        base = n // 2
        rows += [("sft", 1, n, seed, base), ("memft-ot", 1, n, seed, base + 2 + noise[i]),
                 ("memft-sw", 1, n, seed, base + noise[i])]
    rows += [("memft-ot", 1, 40, 0, 40), ("sft", 1, 48, 0, 0)]  # each only in one search: not paired
    df = pd.DataFrame(rows, columns=["method", "rank", "entries", "seed", "entries_recalled"])
    paired = bench.same_books(df).set_index(["method", "measure"])
    ot = paired.loc[("memft-ot", "entries_recalled")]
    assert ot["n"] == 8 and abs(ot["mean"] - 2.0) < 1e-9 and 0 < ot["lo"] < 2 < ot["hi"] and ot["verdict"] == "wins"
    share = paired.loc[("memft-ot", "share_recalled")]
    expect = sum((2 + e) / n for e, n in zip(noise, [8, 8, 16, 16, 24, 24, 32, 32])) / 8
    assert abs(share["mean"] - expect) < 1e-9
    assert paired.loc[("memft-sw", "entries_recalled"), "verdict"] == "tie"
    assert bench.same_books(df[df["method"] != "sft"]).empty


def test_the_window_check_takes_the_plateau_stops_nearest_each_frontier():
    """The plateau rule is checked where a cut that came too soon would move the frontier: per method and rank the
    shortest length it stopped without recall, every seed stopped there (or those asked for); recalled points,
    budget stops and longer plateau stops are left out."""
    bench = _bench()
    rows = [("sft", 1, 45, 0, True, "recalled", 300), ("sft", 1, 49, 0, False, "plateau", 1368),
            ("sft", 1, 49, 1, False, "plateau", 974), ("sft", 1, 49, 2, False, "max_steps", 2000),
            ("sft", 1, 54, 0, False, "plateau", 1189), ("memft-ot", 2, 128, 1, False, "plateau", 1481),
            ("memft-ot", 2, 108, 1, True, "recalled", 1458), ("memft-sw", 1, 64, 0, False, "max_steps", 2000)]
    points = pd.DataFrame(rows, columns=["method", "rank", "length", "seed", "exact_recall", "stop_reason", "steps"])
    assert bench.window_points(points) == [("sft", 1, 49, 0, 1368), ("sft", 1, 49, 1, 974),
                                           ("memft-ot", 2, 128, 1, 1481)]
    assert bench.window_points(points, seeds={1}) == [("sft", 1, 49, 1, 974), ("memft-ot", 2, 128, 1, 1481)]


def test_the_decisive_window_check_takes_the_stops_that_would_move_a_bracket():
    """A cut only turns a failure into a recall: the stops that matter are at a bracket's shortest length not
    recalled, where one more seed recalling makes half the seeds. 1 of 3 there: both plateau stops; 0 of 3: none
    (one more makes 1 of 3); a failure at the budget is not the rule's; stage-2 points are not the search's."""
    bench = _bench()

    def row(m, rank, n, sd, ok, why, around=False):
        return {"method": m, "rank": rank, "length": n, "seed": sd, "exact_recall": ok, "stop_reason": why,
                "steps": 900 + sd, "around": around}
    points = pd.DataFrame([row("sft", 1, 49, 0, False, "plateau"), row("sft", 1, 49, 1, False, "plateau"),
                           row("sft", 1, 49, 2, True, "recalled"), row("sft", 1, 47, 0, False, "plateau"),
                           row("memft-ot", 1, 54, 0, False, "plateau"), row("memft-ot", 1, 54, 1, False, "max_steps"),
                           row("memft-ot", 1, 54, 2, True, "recalled"), row("memft-sw", 1, 56, 0, False, "plateau"),
                           row("memft-sw", 1, 56, 1, False, "plateau"), row("memft-sw", 1, 56, 2, False, "plateau"),
                           row("sft", 1, 49, 0, False, "max_steps", around=True)])
    frontier = pd.DataFrame([{"method": "sft", "rank": 1, "hi": 49}, {"method": "memft-ot", "rank": 1, "hi": 54},
                             {"method": "memft-sw", "rank": 1, "hi": 56}, {"method": "sft", "rank": 2,
                                                                           "hi": float("nan")}])
    assert bench.decisive_points(points, frontier, seeds=3) == [("sft", 1, 49, 0, 900), ("sft", 1, 49, 1, 901),
                                                                 ("memft-ot", 1, 54, 0, 900)]


def test_the_window_check_tells_a_cut_from_a_diverged_path():
    """A point that recalls after the step the rule stopped its copy, on the same curve up to there, was cut short by
    the rule; one whose curve left the copy's before that step is the same point on another floating-point path."""
    bench = _bench()
    rows = [SimpleNamespace(step=s, n_above=a, n_correct=c) for s, a, c in ((0, 0, 0), (10, 2, 5), (20, 4, 9))]
    same = [SimpleNamespace(step=s, n_above=a, n_correct=c) for s, a, c in ((0, 0, 0), (20, 4, 9), (30, 6, 12))]
    other = [SimpleNamespace(step=s, n_above=a, n_correct=c) for s, a, c in ((0, 0, 0), (10, 2, 6), (20, 5, 9))]
    assert bench.diverged_at(rows, same) is None  # only the steps both recorded are compared
    assert bench.diverged_at(rows, other) == 10
    assert bench.window_kind(True, 900, 600, None, True) == "cut short"
    assert bench.window_kind(True, 900, 600, 700, True) == "cut short"  # they parted only after the stop
    assert bench.window_kind(True, 300, 600, 50, True) == "diverged"
    assert bench.window_kind(True, 900, 600, 50, True) == "diverged"
    assert bench.window_kind(False, 2000, 600, None, True) == "held"
    assert bench.window_kind(True, 900, 600, None, False) == "recalled (no copy to compare)"


def test_the_window_check_trains_the_stopped_points_on_without_the_rule(default_model_dir, tmp_path):
    """`window` trains the chosen points again without the plateau rule (until recalled or the step budget), says
    per point whether it recalled and writes the table; run again, it reads its kept points back and trains
    nothing."""
    import subprocess

    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", default_model_dir, context=2048)
    table = tmp_path / "long_context_points.csv"
    pd.DataFrame([("sft", 1, 160, 0, False, "plateau", 12), ("sft", 1, 320, 0, False, "plateau", 30),
                  ("memft-ot", 1, 160, 0, False, "plateau", 10)],
                 columns=["method", "rank", "length", "seed", "exact_recall", "stop_reason", "steps"]).to_csv(table)
    flags = ["--model", str(model), "--ranks", "1", "--methods", "sft", "memft-ot", "--max-steps", "40", "--lr",
             "0.1", "--plateau-window", "2", "--points", str(table), "--keep", str(tmp_path / "kept"),
             "--run-keep", str(tmp_path / "no-copies")]

    def window(home, *more):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memft.py"), "window", *flags, *more,
                               "--home", str(tmp_path / home)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    out = window("a")
    got = pd.read_csv(tmp_path / "long_context_window.csv")
    assert [(m, n) for m, n in zip(got["method"], got["length"])] == [("sft", 160), ("memft-ot", 160)]
    for _, r in got.iterrows():  # trained on to recall or the whole budget, never stopped by the 2-step window
        assert (r["recalled"] and r["stop_reason"] == "recalled") or (not r["recalled"] and r["steps"] == 40), r
    assert f"{int(got['recalled'].sum())} of 2 points the rule stopped recalled without it. 0 of 2 were cut" in out
    assert set(got["kind"]) <= {"held", "recalled (no copy to compare)"}
    assert got["open_wait"].notna().all() and got["late_delta_loss"].notna().all()  # where each stood at its end
    if not got["recalled"].all():
        assert "Where the held points stood at the 40-step budget:" in out
    assert "window: 0 points without the rule to train" in window("b")
    # the run goes on and the nearest stop moves (sft now stopped at 100 tokens): the new point is trained and the
    # table keeps the ones checked before
    pd.read_csv(table).pipe(lambda d: pd.concat([d, pd.DataFrame([{"method": "sft", "rank": 1, "length": 100,
                                                                    "seed": 0, "exact_recall": False,
                                                                    "stop_reason": "plateau", "steps": 8}])])) \
        .to_csv(table, index=False)
    assert "window: 1 point without the rule to train" in window("b")
    got = pd.read_csv(tmp_path / "long_context_window.csv")
    assert sorted(zip(got["method"], got["length"])) == [("memft-ot", 160), ("sft", 100), ("sft", 160)]
    # both methods' nearest stops move again; --methods memft-ot checks memft-ot's alone, the table keeps the rest
    pd.read_csv(table).pipe(lambda d: pd.concat([d, pd.DataFrame([
        {"method": "sft", "rank": 1, "length": 80, "seed": 0, "exact_recall": False, "stop_reason": "plateau",
         "steps": 8},
        {"method": "memft-ot", "rank": 1, "length": 120, "seed": 0, "exact_recall": False,
         "stop_reason": "plateau", "steps": 8}])])).to_csv(table, index=False)
    assert "window: 1 point without the rule to train" in window("b", "--methods", "memft-ot")
    got = pd.read_csv(tmp_path / "long_context_window.csv")
    assert sorted(zip(got["method"], got["length"])) == [("memft-ot", 120), ("memft-ot", 160), ("sft", 100),
                                                         ("sft", 160)]


def test_the_long_context_benchmark_runs_both_stages_and_reports_complete_tables(default_model_dir, tmp_path):
    """The whole experiment on a tiny model, as a user runs it: `run` places every frontier and trains the points at
    0.5, 1.5 and 2 × sft's ℓ* (beside the search, once sft's frontier at that rank is placed), and `report --out`
    writes complete tables (the brackets, the paired differences there, the law past the frontier) that a fresh
    store reads back without training anything again."""
    import json
    import math
    import re
    import subprocess

    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", default_model_dir, context=2048)  # the benchmark draws 1,280 tokens
    flags = ["--model", str(model), "--ranks", "1", "2", "--seeds", "0", "1", "--methods", "sft", "memft-ot",
             "--max-steps", "60", "--lr", "0.1", "--plateau-window", "20", "--resolution", "0.3",
             "--keep", str(tmp_path / "kept")]

    def bench(*args, home):
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_memft.py"), *args, *flags, "--home",
                               str(tmp_path / home)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    out = bench("run", home="a")
    # a rank's points around sft's frontier trained beside the search, before its last probes
    assert re.search(r"training, [1-9]\d*-\d+ to go \(and [1-9]\d* points? around sft's frontier", out), out
    kept = sorted(p.name for p in (tmp_path / "kept").glob("*.json.gz"))
    out = bench("report", "--out", str(tmp_path / "out"), home="b")
    assert out.rstrip().splitlines()[-3] == "complete"
    front = pd.read_csv(tmp_path / "out" / "long_context_frontier.csv")
    assert len(front) == 4 and front["settled"].all() and (front["lo"] < front["hi"]).all()
    # the fitted ℓ* with its interval, and memft-ot's minus sft's with the interval of the difference
    assert ((front["fitted_lo"] <= front["fitted_ell_star"]) & (front["fitted_ell_star"] <= front["fitted_hi"])).all()
    ot = front[front["method"] == "memft-ot"]
    assert ((ot["minus_sft_lo"] <= ot["minus_sft_hi"]) & ot["minus_sft_verdict"].isin(["more", "fewer", "tie"])).all()
    assert front.loc[front["method"] == "sft", "minus_sft"].isna().all()
    points = pd.read_csv(tmp_path / "out" / "long_context_points.csv")
    for rank in (1, 2):
        lo, hi = front[(front["method"] == "sft") & (front["rank"] == rank)][["lo", "hi"]].iloc[0]
        for f in (0.5, 1.5, 2.0):  # stage 2: every method and seed at each multiple of sft's ℓ*
            at = points[(points["rank"] == rank) & (points["length"] == max(1, round(f * math.sqrt(lo * hi))))
                        & points["around"]]
            assert {(m, s) for m, s in zip(at["method"], at["seed"])} >= {(m, s) for m in ("sft", "memft-ot")
                                                                          for s in (0, 1)}
            assert set(at["stop_reason"]) <= {"recalled", "max_steps"}  # on the common budget, never the plateau
    assert (points[~points["around"]]["stop_reason"] == "plateau").any()  # which the search's probes do stop on
    past = points["around"] & ~points["where"].astype(str).str.startswith("0.5") & ~points["exact_recall"]
    assert past.any() and points.loc[past, "open_wait"].notna().all()  # where each stood at the budget
    assert points.loc[~past, "open_wait"].isna().all()
    assert "on a plateau at the budget" in out
    law = pd.read_csv(tmp_path / "out" / "long_context_law.csv").set_index("method")
    assert set(law.index) == {"sft", "memft-ot"}
    assert law["fitted_on"].str.startswith("stage 2's points past the frontier").all()
    assert ((law["alpha_lo"] <= law["alpha"]) & (law["alpha"] <= law["alpha_hi"])).all()
    side = json.loads((tmp_path / "out" / "long_context.json").read_text())
    assert side["state"] == "complete" and side["command"].startswith("python bench/bench_memft.py run")
    again = bench("run", home="c")  # a fresh store: every point read back, nothing trained twice
    assert "stage 2: 0 points around the frontier to train" in again
    assert sorted(p.name for p in (tmp_path / "kept").glob("*.json.gz")) == kept


def _ends_table(new_at_hi: bool):
    """Points of two methods at ranks 1 and 2 drawn from known frontiers (memft-ot's 1.25 × sft's, 20·r tokens),
    seeds 0-9 shipped, seeds 10 and 11 new at the rank-1 bracket ends only: drawn from the same curves, or (with
    `new_at_hi`) both recalling at a length far past the frontier."""
    import math

    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for method, scale in (("sft", 1.0), ("memft-ot", 1.25)):
        for rank in (1, 2):
            for length in (8, 12, 16, 20, 24, 28, 32, 40, 48, 64):
                for seed in range(10):
                    p = 1 / (1 + math.exp(-6 * (math.log(20 * scale * rank) - math.log(length))))
                    rows.append({"method": method, "rank": rank, "length": length, "seed": seed, "around": False,
                                 "exact_recall": bool(rng.random() < p), "p_eff": 1152 * rank})
    ends = [("sft", 1, "lo", 16), ("sft", 1, "hi", 24), ("memft-ot", 1, "lo", 20), ("memft-ot", 1, "hi", 32)]
    for method, rank, end, length in ends:
        for seed in (10, 11):
            recalled = end == "lo" or (new_at_hi and method == "sft")
            rows.append({"method": method, "rank": rank, "length": length if not (new_at_hi and end == "hi") else 64,
                         "seed": seed, "around": False, "exact_recall": recalled, "p_eff": 1152 * rank})
    if new_at_hi:
        ends = [e if e[2] == "lo" else (*e[:3], 64) for e in ends]
    return pd.DataFrame(rows), ends


def test_the_frontier_spot_check_counts_each_end_against_the_shipped_fit_and_refits_over_every_seed():
    """New seeds at the bracket ends are checked against the frontier fitted to the shipped seeds alone; a new
    count the fit makes implausible (2 of 2 recalled far past the frontier) is outside. The refit over every seed
    keeps memft-ot's known lead over sft; no difference is given at a rank where sft's bracket is not placed."""
    df, ends = _ends_table(new_at_hi=False)
    t = _bench().frontier_spot(df, ends, (10, 11), sft_placed={1}, shipped_seeds=range(10)).set_index(["method", "end"])
    assert list(t["new_runs"]) == [2, 2, 2, 2] and list(t["shipped_runs"]) == [10, 10, 10, 10]
    assert t.loc[("sft", "lo"), "new_recalled"] == 2 and t["inside"].all()
    assert t.loc[("sft", "lo"), "p_fit"] > t.loc[("sft", "hi"), "p_fit"]
    ot = t.loc[("memft-ot", "lo")]
    truth = 0.25 * 20
    assert ot["pooled_minus_sft_lo"] < truth < ot["pooled_minus_sft_hi"]
    assert ot["pooled_minus_sft_verdict"] == ot["shipped_minus_sft_verdict"] == "more"
    assert ot["pooled_lo"] < 25 < ot["pooled_hi"]
    no_sft = _bench().frontier_spot(df, ends, (10, 11), sft_placed=set(), shipped_seeds=range(10))
    assert "pooled_minus_sft" not in no_sft.columns

    df, ends = _ends_table(new_at_hi=True)
    t = _bench().frontier_spot(df, ends, (10, 11), sft_placed={1}, shipped_seeds=range(10)).set_index(["method", "end"])
    assert t.loc[("sft", "hi"), "length"] == 64 and t.loc[("sft", "hi"), "new_recalled"] == 2
    assert not t.loc[("sft", "hi"), "inside"]  # sft recalling 64 tokens on both new seeds: far past its frontier
    assert t.loc[("memft-ot", "hi"), "inside"]  # memft-ot failing there, as its fit says


def test_the_frontier_spot_counts_the_benchmarks_seeds_as_shipped_and_only_the_new_seeds_points_at_the_ends():
    """A store that also holds another spot's seeds (12: not this check's) and the new seeds' points away from the
    ends: none of them is counted as shipped or enters the refit."""
    df, ends = _ends_table(new_at_hi=False)
    extra = pd.DataFrame([{"method": "sft", "rank": 1, "length": 24, "seed": 12, "around": False,
                           "exact_recall": True, "p_eff": 1152},
                          {"method": "sft", "rank": 1, "length": 64, "seed": 10, "around": False,
                           "exact_recall": True, "p_eff": 1152}])
    bench = _bench()
    plain = bench.frontier_spot(df, ends, (10, 11), sft_placed={1}, shipped_seeds=range(10))
    more = bench.frontier_spot(pd.concat([df, extra], ignore_index=True), ends, (10, 11), sft_placed={1},
                               shipped_seeds=range(10))
    pd.testing.assert_frame_equal(plain, more)


def test_a_spot_re_run_needs_seeds_other_than_the_benchmarks():
    problem = _bench().spot_seeds_problem
    assert problem([3, 4], (0, 1, 2)) is None
    assert problem(None, (0, 1, 2)) == ("spot needs other seeds than the benchmark's own (0, 1, 2): e.g. --seeds 3 4")
    assert problem([2, 3], (0, 1, 2)) == ("seed 2 is the benchmark's own (its seeds: 0, 1, 2): a spot re-run needs "
                                          "other seeds")


def test_a_frontier_spot_takes_both_ends_of_the_placed_brackets_only():
    fr = pd.DataFrame([{"method": "sft", "rank": 1, "lo": 47, "hi": 49, "settled": True},
                       {"method": "sft", "rank": 2, "lo": 113, "hi": 118, "settled": False},
                       {"method": "memft-ot", "rank": 1, "lo": 52, "hi": 54, "settled": True}])
    assert _bench().bracket_ends(fr, ["sft", "memft-ot"], [1, 2]) == [
        ("sft", 1, "lo", 47), ("sft", 1, "hi", 49), ("memft-ot", 1, "lo", 52), ("memft-ot", 1, "hi", 54)]
    assert _bench().bracket_ends(fr, ["sft"], [2]) == []
