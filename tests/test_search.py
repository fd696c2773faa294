"""The frontier by search: bisection in log length per rank, probes trained together and stored as a sweep's runs."""

import json
import math

import pandas as pd
import pytest

from memcore.cli import main
from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec
from memcore.frontier import frontier_from_table
from memcore.search import Bracket, FrontierSearch, SearchSpec, grid_lengths, search_result
from memcore.store import Store
from memcore.sweep import SweepSpec, run_sweep, sweep_table


def _template(model_dir, steps=60):
    return RunSpec(model=ModelSpec(name=str(model_dir)),
                   adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.0),
                   data=DataSpec(random_tokens=96),
                   train=TrainSpec(max_steps=steps, lr=0.1, checkpoint_every=0, history="decimated"))


def _oracle_search(frontier: float, resolution=0.05, start=32, longest=4096, rank=1):
    """A bracket driven by a known frontier: lengths <= frontier are recalled."""
    spec = SearchSpec(template=RunSpec(), ranks=(rank,), resolution=resolution, start_length=start)
    b = Bracket("sft", rank)
    probes = []
    while (n := b.next_length(spec, longest)) is not None:
        probes.append(n)
        b.probed[n] = {0: n <= frontier}
        b.record(n)
    return b, probes


@pytest.mark.parametrize("frontier", [1, 3, 37, 39.5, 150, 1000, 4095])
def test_bisection_places_the_frontier_within_the_resolution(frontier):
    b, probes = _oracle_search(frontier)
    assert len(set(probes)) == len(probes)  # never probes a length twice
    assert b.lo <= frontier < b.hi
    assert b.hi <= b.lo + 1 or b.hi / b.lo <= 1.05 + 1e-9
    # a grid at the same resolution over 1..4096 tokens would need ~170 lengths; the search doubles (or halves)
    # from its start until it brackets the frontier, then halves a factor-2 bracket down to 5%
    doublings = math.ceil(abs(math.log2(max(frontier, 1) / 32))) + 1
    assert len(probes) <= doublings + math.ceil(math.log2(math.log(2) / math.log(1.05))) + 1


@pytest.mark.parametrize("frontier", [0.5, 1, 3, 37, 39.5, 47, 150, 1000, 4095, 5000])
def test_lengths_left_bounds_the_probes_the_search_still_makes(frontier):
    """A user is told how many probes are to go: the search, whatever the frontier, ends within those counts."""
    spec = SearchSpec(template=RunSpec(), ranks=(1,), resolution=0.05, start_length=32)
    _, probes = _oracle_search(frontier)
    b = Bracket("sft", 1)
    for done, n in enumerate(probes):
        fewest, most = b.lengths_left(spec, 4096)
        assert 1 <= fewest <= len(probes) - done <= most
        b.probed[n] = {0: n <= frontier}
        b.record(n)
    assert b.lengths_left(spec, 4096) == (0, 0)
    # from a factor-2 bracket to 5%: 32..64 tokens takes 4 or 5 more lengths, wherever the frontier lies in it
    assert Bracket("sft", 1, lo=32, hi=64).lengths_left(spec, 4096) == (4, 5)


def test_a_frontier_outside_the_lengths_is_a_bound():
    b, _ = _oracle_search(10_000, longest=300)
    assert b.outcome(300, 1) == ("at least", 300.0)
    b, _ = _oracle_search(0.5)
    assert b.outcome(4096, 1) == ("at most", 1.0)


def test_a_frontier_below_the_shortest_length_allowed_is_an_upper_bound():
    from memcore.search import SearchProgress, SearchResult

    pinned = Bracket("sft", 1, lo=None, hi=4, probed={4: {0: False}})
    progress = SearchProgress(probes_done=1, in_flight=0, steps=10, seconds=1.0, brackets=[pinned])
    (row,) = SearchResult("s", progress, longest=96, fits={}, fit_errors={}, shortest=4).rows()
    assert (row["outcome"], row["ell_star"], row["hi_seeds"]) == ("at most", 4.0, 1)


def test_grid_lengths_are_as_fine_as_the_resolution():
    g = grid_lengths(16, 192, 0.05)
    assert g[0] == 16 and g[-1] >= 192
    assert all(b > a for a, b in zip(g, g[1:]))
    assert all(b / a <= 1.05 + 1 / a for a, b in zip(g, g[1:]))


def test_bad_search_settings_are_named(tiny_model_dir):
    t = _template(tiny_model_dir)
    with pytest.raises(MemcoreError, match="resolution"):
        SearchSpec(template=t, resolution=0)
    with pytest.raises(MemcoreError, match="ranks"):
        SearchSpec(template=t, ranks=(0,))
    with pytest.raises(MemcoreError, match="seeds repeat"):
        SearchSpec(template=t, seeds=(1, 1))
    with pytest.raises(MemcoreError, match="unknown method"):
        SearchSpec(template=t, methods=("adam",))


def test_search_matches_a_fine_grid_and_stores_its_probes_as_a_sweep(tiny_model_dir, home):
    store = Store(home)
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1, 2, 4), seeds=(0, 1), start_length=4,
                        name="s")
    fs = FrontierSearch(search, store)
    progress = list(fs.run())
    last = progress[-1]
    assert last.finished and not last.stopped
    assert last.probes_left == (0, 0)
    for p in progress:  # the probes to go bound what the search went on to train
        assert p.in_flight <= p.probes_left[1]
        assert p.probes_left[0] <= last.probes_done - p.probes_done <= p.probes_left[1]
    assert [p.probes_done for p in progress] == sorted(p.probes_done for p in progress)
    rows = sweep_table(store, "s")
    assert len(rows) == last.probes_done == sum(len(v) for b in fs.brackets for v in b.probed.values())
    for b in fs.brackets:
        assert b.lo is not None and b.hi is not None  # bracketed inside 1..96 tokens
        assert b.hi <= b.lo + 1 or b.hi / b.lo <= 1.05
        mine = [r for r in rows if r["rank"] == b.rank]
        # every probe stopped for a reason a probe may stop for, and the recalled ones stopped as soon as recalled
        assert {r["stop_reason"] for r in mine} <= {"recalled", "all_above_tau", "plateau", "max_steps"}
        assert all(r["steps"] < 60 for r in mine if r["exact_recall"])
        for r in mine:  # the bracket agrees with every probe
            rate = b.rate(r["length"])
            assert (rate >= 0.5) == (r["length"] <= b.lo)

    # the same probes, trained as a grid of every length around the brackets, give the same frontier
    lengths = tuple(sorted({n for b in fs.brackets for n in range(max(1, b.lo - 2), b.hi + 3)}))
    probe = search.probe_spec("sft", 1, 1, 0)
    grid = SweepSpec(template=probe, ranks=(1, 2, 4), lengths=lengths, methods=("sft",), seeds=(0, 1), name="g")
    # a sweep trains a fixed budget: give its points the probes' own stop rules instead
    import memcore.sweep as sw

    real_points = sw.points

    def probe_points(s):
        return [sw.Point(p.key, search.probe_spec(p.values["method"], p.values["rank"], p.values["length"],
                                                  p.values["seed"]), p.values) for p in real_points(s)]

    sw.points = probe_points
    try:
        list(run_sweep(grid, store, batch=8))
    finally:
        sw.points = real_points
    grid_df = pd.DataFrame(sweep_table(store, "g"))
    for b in fs.brackets:
        at = grid_df[grid_df["rank"] == b.rank].groupby("length")["exact_recall"].mean()
        assert at[b.lo] >= 0.5 > at[b.hi]  # the grid sees the same verdicts at the bracket's ends

    # the law page and `frontier` read the search like a sweep
    per_rank, fit, why = frontier_from_table(pd.DataFrame(rows), "sft")
    assert fit is not None, why
    result = search_result(fs, last)
    by_rank = {r["rank"]: r for r in result.rows()}
    for b in fs.brackets:
        assert by_rank[b.rank]["outcome"] == "bracketed"
        assert b.lo <= by_rank[b.rank]["ell_star"] <= b.hi


def test_a_stopped_search_resumes_and_a_finished_one_trains_nothing_new(tiny_model_dir, home):
    store = Store(home)
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1, 2), seeds=(0,), start_length=4, name="r")
    done = []

    def stop():
        return len(done) >= 2

    fs = FrontierSearch(search, store, should_stop=stop)
    seen = []
    for progress in fs.run():
        seen.append(progress)
        done = [b for b in fs.brackets for _ in b.probed]
    assert seen[-1].stopped and not seen[-1].finished
    again = FrontierSearch(search, store)
    last = list(again.run())[-1]
    assert last.finished
    n_runs = len(store.runs(sweep="r", status="completed"))
    third = FrontierSearch(search, store)
    final = list(third.run())[-1]
    assert final.finished and len(store.runs(sweep="r")) == len(store.runs(sweep="r"))
    assert len(store.runs(sweep="r", status="completed")) == n_runs  # every verdict came from the store
    assert [(b.lo, b.hi) for b in third.brackets] == [(b.lo, b.hi) for b in again.brackets]


def test_the_cli_searches_and_predict_reads_the_search(tiny_model_dir, home, capsys):
    code = main(["frontier", "--search", "--model", str(tiny_model_dir), "--ranks", "1", "2", "--random-tokens", "64",
                 "--max-steps", "40", "--lr", "0.1", "--dropout", "0", "--start-length", "4", "--name", "cli",
                 "--checkpoint-every", "0", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["search"] == "cli" and out["progress"]["finished"]
    ranks = {r["rank"]: r for r in out["ranks"]}
    assert set(ranks) == {1, 2} and all(r["lo"] is not None and r["hi"] is not None for r in ranks.values())
    assert main(["frontier", "--sweep", "cli", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    # the stored search read back gives the capacity the search itself reported (random tokens: capped at log2 V)
    again = {r["rank"]: r["bits_per_param"] for r in table["sft"]["fit_per_rank"]}
    assert again == pytest.approx({r: ranks[r]["bits_per_param"] for r in ranks}, rel=1e-9)
    code = main(["predict", "--verbatim", "--length", str(ranks[2]["lo"]), "--sweep", "cli", "--json"])
    assert code == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["rank"] == 2 or ans["rank"] < 2 and ranks[1]["lo"] >= ranks[2]["lo"]
    with pytest.raises(SystemExit):
        main(["frontier", "--search", "--seeds", "x"])
    assert main(["frontier", "--search", "--seeds", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["frontier", "--search", "--ranks", "1", "1"]) == 2
    assert "the ranks repeat" in capsys.readouterr().err
    assert main(["frontier", "--ranks", "1"]) == 2  # search flags without --search
    assert "applies only with --search" in capsys.readouterr().err
    assert main(["frontier", "--sweep", "nope"]) == 2
    assert "no sweep or frontier search 'nope'" in capsys.readouterr().err


def test_a_search_is_named_by_what_its_probes_share(tiny_model_dir):
    """The app and the CLI build their templates from different starting ranks and methods; every probe sets those
    itself, so the same settings give the same search (and share their probes)."""
    from dataclasses import replace

    t = _template(tiny_model_dir)
    other = replace(t, adapter=replace(t.adapter, rank=8), train=replace(t.train, method="memft-sw", seed=3))
    assert SearchSpec(template=t).id == SearchSpec(template=other).id
    lr = replace(t, train=replace(t.train, lr=0.5))
    assert SearchSpec(template=lr).id != SearchSpec(template=t).id


def test_a_bracket_set_by_the_step_budget_is_said():
    from memcore.search import budget_notes

    probes = [{"rank": 1, "method": "sft", "exact_recall": n <= 8, "length": n, "steps": 40 if n > 8 else 12,
               "stop_reason": "max_steps" if n > 8 else "recalled"} for n in (8, 9, 11, 16)]
    (note,) = budget_notes(probes)
    assert "rank 1" in note and "3 of its 3 unrecalled probes" in note and "40 steps" in note
    for p in probes:
        p["stop_reason"] = "plateau" if not p["exact_recall"] else p["stop_reason"]
    assert budget_notes(probes) == []


def test_a_phonebook_search_counts_entries_and_budgets_in_epochs():
    from memcore.config import AdapterSpec, DataSpec, RunSpec, TrainSpec
    from memcore.search import SearchSpec

    template = RunSpec(adapter=AdapterSpec(kind="bypass", rank=1, layers="paper"), data=DataSpec(phonebook=500),
                       train=TrainSpec(batch_size=10, max_steps=1))
    s = SearchSpec(template=template, ranks=(1, 2), methods=("sft", "memft-sw"), unit="entries", epochs=200)
    probe = s.probe_spec("memft-sw", 2, 45, seed=3)
    # a book of 45 entries drawn by the seed, 5 minibatches an epoch, 200 epochs
    assert probe.data.phonebook == 45 and probe.data.seed == 3 and probe.train.max_steps == 200 * 5
    assert probe.adapter.rank == 2 and probe.train.method == "memft-sw"
    # the book's size is the probe's, not the search's: searches over other sizes share probes
    other = SearchSpec(template=RunSpec(adapter=template.adapter, data=DataSpec(phonebook=900), train=template.train),
                       unit="entries", epochs=200)
    assert other.id == s.id
    with pytest.raises(MemcoreError, match="needs PhoneBook data"):
        SearchSpec(template=RunSpec(data=DataSpec(random_tokens=64)), unit="entries")
    with pytest.raises(MemcoreError, match="budget in epochs needs"):
        SearchSpec(template=RunSpec(data=DataSpec(phonebook=50)), unit="entries", epochs=100)


def test_a_search_over_a_phonebook_file_takes_its_first_entries(tiny_model_dir, home):
    """The paper's own PB files (JSONL pairs) go through the same search: a probe of n entries is the file's
    first n, and the longest book is the file's size."""
    pairs = tuple((f"Name: Person {i}:", f" {1000000000 + 7919 * i}") for i in range(12))
    template = RunSpec(model=ModelSpec(name=str(tiny_model_dir)),
                       adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.0),
                       data=DataSpec(pairs=pairs), train=TrainSpec(batch_size=4, lr=0.1, checkpoint_every=0))
    s = SearchSpec(template=template, ranks=(1,), seeds=(0,), unit="entries", epochs=2, start_length=4)
    probe = s.probe_spec("sft", 1, 5, seed=1)
    assert probe.data.pairs == pairs[:5] and probe.data.phonebook is None and probe.train.max_steps == 2 * 2
    fs = FrontierSearch(s, Store(home))
    assert fs.longest == 12
    with pytest.raises(MemcoreError, match="hold only 12"):
        FrontierSearch(SearchSpec(template=template, unit="entries", epochs=2, max_length=20), Store(home))


def _oracle_runs(frontiers: dict[int, float], slots: int, order: list):
    """An execute_many that trains nothing: `slots` probes at a time, each ending (in the order started) recalled
    when its length is at most its seed's frontier; `order` collects (length, seed) as probes start."""
    from types import SimpleNamespace

    def fake(runs, store, base, *, slots=slots, max_rank=1, should_stop=None):
        runs, flying = iter(runs), []
        while True:
            while len(flying) < slots:
                run = next(runs, "end")
                if run is None or run == "end":
                    break
                flying.append(run)
                order.append((run.tag.length, run.tag.seed))
            if not flying:
                if run == "end":
                    return
                raise AssertionError("the search waits on nothing in training")
            run = flying.pop(0)
            p = run.tag
            summary = SimpleNamespace(exact_recall=p.length <= frontiers[p.seed], steps=10, status="completed")
            yield p, SimpleNamespace(final=True, step=10, summary=summary)
    return fake


@pytest.mark.parametrize("frontiers", [{0: 40, 1: 44, 2: 37}, {0: 40, 1: 40, 2: 40}, {0: 10, 1: 200, 2: 52}])
def test_a_verdict_settled_by_the_first_seeds_skips_the_rest_but_the_ends_get_every_seed(
        tiny_model_dir, home, monkeypatch, frontiers):
    """Three seeds: two that agree settle a length (recalled by at least half of the seeds whatever the third
    gives), so the third is not trained there; the bracket is the one every seed would give, and its two ends still
    have all three seeds' verdicts, so the recall rates at the ends are over every seed."""
    import memcore.runner

    order = []
    monkeypatch.setattr(memcore.runner, "execute_many", _oracle_runs(frontiers, slots=2, order=order))
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=(0, 1, 2), start_length=32,
                        max_length=96, name="early")
    fs = FrontierSearch(search, Store(home), batch=2)
    progress = list(fs.run())
    b = fs.brackets[0]
    assert progress[-1].finished and progress[-1].probes_left == (0, 0)

    # the bracket every seed would give: a length is recalled when at least 2 of the 3 seeds recall it
    full = Bracket("sft", 1)
    while (n := full.next_length(search, 96)) is not None:
        full.probed[n] = {s: n <= f for s, f in frontiers.items()}
        full.record(n)
    assert (b.lo, b.hi) == (full.lo, full.hi)
    for end in (b.lo, b.hi):
        if end is not None:
            assert sorted(b.probed[end]) == [0, 1, 2]
            assert b.rate(end) == full.rate(end)
    assert len(order) == len(set(order)) == progress[-1].probes_done  # nothing trained twice
    agree = [n for n in full.probed if n not in (b.lo, b.hi) and len(set(full.probed[n][s] for s in (0, 1))) == 1]
    assert len(order) <= 3 * len(full.probed) - len(agree)  # a third seed skipped wherever the first two agree
    for p in progress:  # the probes to go bound what the search went on to train
        assert p.probes_left[0] <= progress[-1].probes_done - p.probes_done <= p.probes_left[1]


@pytest.mark.parametrize("stop_after", [9, 12, 15])
def test_a_stopped_search_says_what_is_left_as_a_fresh_read_of_its_store_does(tiny_model_dir, home, monkeypatch,
                                                                              stop_after):
    """Stopped while an end's last seed trains, the search that stopped and a fresh one reading the same verdicts
    agree on what is still to train (the cut-off probe included) and on which brackets are unsettled; nothing is
    left counted as in training."""
    from types import SimpleNamespace

    import memcore.runner

    frontiers = {0: 40, 1: 44, 2: 37}
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=(0, 1, 2), start_length=32,
                        max_length=96, name="stopped")
    known, asked = {}, [False]

    def fake(runs, store, base, *, slots, max_rank=1, should_stop=None):
        for run in runs:
            if should_stop():
                return  # as execute_many: the run taken for the slot is never started
            p = run.tag
            if len(known) == stop_after:  # the stop comes while this one trains
                asked[0] = True
                s = SimpleNamespace(status="stopped", steps=3, exact_recall=False)
            else:
                s = SimpleNamespace(status="completed", steps=10, exact_recall=p.length <= frontiers[p.seed])
                known[search.label(p.bracket.method, p.bracket.rank, p.length, p.seed)] = s
            yield p, SimpleNamespace(final=True, step=s.steps, summary=s)

    monkeypatch.setattr(memcore.runner, "execute_many", fake)
    monkeypatch.setattr(FrontierSearch, "_completed", lambda self: dict(known))
    fs = FrontierSearch(search, Store(home), batch=1, should_stop=lambda: asked[0])
    last = list(fs.run())[-1]
    assert last.stopped and not last.finished and last.in_flight == 0
    fresh = FrontierSearch(search, Store(home), batch=1)
    again = fresh.read()
    assert last.probes_left == again.probes_left and last.probes_left[0] >= 1
    assert [b.rank for b in fs.unsettled()] == [b.rank for b in fresh.unsettled()] == [1]


def test_on_a_device_with_free_slots_the_later_seeds_train_at_once(tiny_model_dir, home, monkeypatch):
    """Where a slot left empty is the waste (a GPU: hold=False, the default there), a length's later seeds fill the
    free slots at once instead of waiting for the first ones: the same bracket, every seed at every length."""
    import memcore.runner

    frontiers = {0: 40, 1: 44, 2: 37}
    order = []
    monkeypatch.setattr(memcore.runner, "execute_many", _oracle_runs(frontiers, slots=9, order=order))
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=(0, 1, 2), start_length=32,
                        max_length=96, name="at-once")
    fs = FrontierSearch(search, Store(home), batch=9, hold=False)
    assert FrontierSearch(search, Store(home), batch=9).hold  # on this CPU the default holds them
    list(fs.run())
    b = fs.brackets[0]
    assert (b.lo, b.hi) == (40, 41)
    assert all(sorted(seeds) == [0, 1, 2] for seeds in b.probed.values())
    assert len(order) == 3 * len(b.probed)


def _oracle_points(frontiers: dict[tuple[int, int], float], slots: int, order: list, stop_after: int | None = None,
                   stop=None):
    """An execute_many over probes and points beside the search alike, training nothing: `slots` at a time, each
    ending in the order started, recalled when its length is at most frontiers[(method, rank, seed)] (or
    frontiers[(rank, seed)], the same for every method); `order` collects (kind, rank, length, seed) as each starts.
    After `stop_after` endings the next one is cut off and stop() asked."""
    from types import SimpleNamespace

    def point(tag):
        if hasattr(tag, "point"):
            return ("also", *tag.point[1:])
        return ("probe", tag.bracket.rank, tag.length, tag.seed)

    def fake(runs, store, base, *, slots=slots, max_rank=1, should_stop=None):
        runs, flying, ended = iter(runs), [], 0
        while True:
            while len(flying) < slots and not (should_stop and should_stop()):
                run = next(runs, "end")
                if run is None or run == "end":
                    break
                flying.append(run)
                order.append(point(run.tag))
            if not flying:
                if run == "end" or (should_stop and should_stop()):
                    return
                raise AssertionError("the search waits on nothing in training")
            run = flying.pop(0)
            _, rank, length, seed = point(run.tag)
            method = run.tag.point[0] if hasattr(run.tag, "point") else run.tag.bracket.method
            if stop_after is not None and ended == stop_after:
                stop()
                summary = SimpleNamespace(exact_recall=False, steps=3, status="stopped")
            else:
                frontier = frontiers.get((method, rank, seed), frontiers.get((rank, seed)))
                summary = SimpleNamespace(exact_recall=length <= frontier, steps=10, status="completed")
            ended += 1
            yield run.tag, SimpleNamespace(final=True, step=summary.steps, summary=summary)
    return fake


def _around(placed, fs=None):
    """Points beside the search: every seed at 0.5, 1.5 and 2 × a placed bracket's geometric mean; with `fs`, also
    the first two seeds at each length its rank-2 bracket may probe next, whichever way the verdict it waits for
    falls (so the search asks for points while they train beside it)."""
    import copy

    out = []
    for b in placed:
        ell = math.sqrt(b.lo * b.hi)
        out += [("sft", b.rank, max(1, round(f * ell)), s) for f in (0.5, 1.5, 2.0) for s in (0, 1, 2)]
    if fs is not None:
        b2 = fs.brackets[1]
        waiting = fs.waiting.get(("sft", 2))
        if waiting is not None:
            for recalled in (True, False):
                nxt = copy.deepcopy(b2)
                nxt.record(waiting, recalled=recalled)
                if (n := nxt.next_length(fs.search, fs.longest)) is not None:
                    out += [("sft", 2, n, s) for s in (0, 1)]
    return out


@pytest.mark.parametrize("rank2", [(70, 82, 75), (75, 75, 75), (60, 90, 90)])
@pytest.mark.parametrize("slots", [3, 4])
def test_points_beside_the_search_train_once_their_bracket_is_placed_and_never_twice(tiny_model_dir, home,
                                                                                      monkeypatch, rank2, slots):
    """`also`: points that depend on a placed bracket fill the slots the search leaves free as soon as it is placed
    (before the search ends), a point the search asks for while it trains beside it trains once with its verdict
    taken by the bracket (and counts among the first seeds there), and the brackets are the ones the search gives
    alone."""
    import memcore.runner

    frontiers = {(1, 0): 40, (1, 1): 44, (1, 2): 37, **{(2, s): f for s, f in enumerate(rank2)}}
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1, 2), seeds=(0, 1, 2), start_length=32,
                        max_length=96, name="beside")
    alone_order, order = [], []
    monkeypatch.setattr(memcore.runner, "execute_many", _oracle_points(frontiers, slots=slots, order=alone_order))
    alone = FrontierSearch(search, Store(home / "a"), batch=slots)
    list(alone.run())
    monkeypatch.setattr(memcore.runner, "execute_many", _oracle_points(frontiers, slots=slots, order=order))
    fs = FrontierSearch(search, Store(home / "b"), batch=slots, also=lambda placed: _around(placed, fs))
    awaited = []
    ask = fs._ask

    def watching(b, length, seeds, first):
        found = ask(b, length, seeds, first)
        awaited.extend(p for p in fs.awaited if p[2] == length and p[1] == b.rank)
        return found

    fs._ask = watching
    progress = list(fs.run())
    assert progress[-1].finished and progress[-1].also_in_flight == 0
    assert [(b.lo, b.hi, b.probed) for b in fs.brackets] == [(b.lo, b.hi, b.probed) for b in alone.brackets]
    assert awaited  # the search asked for points while they trained beside it ...
    trained = [o[1:] for o in order]
    assert len(trained) == len(set(trained))  # ... and nothing was trained twice, probe or point beside
    for _, rank, length, _ in awaited:  # and those counted among the first seeds: no third seed where two agree
        got = fs.brackets[rank - 1].probed[length]
        if length not in (fs.brackets[rank - 1].lo, fs.brackets[rank - 1].hi) and len(set(got.values())) == 1:
            assert len(got) == 2
    wanted = set(_around(fs.brackets))
    assert {("sft", *o) for o in trained} >= wanted  # every point beside the search trained (or was a probe)
    first_also = next(i for i, o in enumerate(order) if o[0] == "also")
    last_probe = max(i for i, o in enumerate(order) if o[0] == "probe")
    assert first_also < last_probe  # they started before the search ended
    assert progress[-1].also_done == sum(o[0] == "also" for o in order)


def _stop_beside(search, frontiers, slots, stop_after, base, home, monkeypatch, also_of=_around):
    """Run `search` with points beside it (_around) until the oracle cuts off its `stop_after`-th ending, and check
    that a fresh search reading the same verdicts agrees with it. Returns (how many points a bracket awaited at the
    stop, or None when the search finished first; the base, to share)."""
    import memcore.runner

    known, at_stop, now = {}, [], []
    inner = _oracle_points(frontiers, slots=slots, order=[], stop_after=stop_after,
                           stop=lambda: at_stop.append(len(now[-1].awaited)))

    def recording(runs, store, base, **kw):
        for tag, r in inner(runs, store, base, **kw):
            if r.summary.status == "completed":
                point = tag.point if hasattr(tag, "point") else (tag.bracket.method, tag.bracket.rank, tag.length,
                                                                 tag.seed)
                known[search.label(*point)] = r.summary
            yield tag, r

    monkeypatch.setattr(memcore.runner, "execute_many", recording)
    monkeypatch.setattr(FrontierSearch, "_completed", lambda self: dict(known))
    now.append(FrontierSearch(search, Store(home), base, batch=slots, should_stop=lambda: bool(at_stop),
                              also=lambda placed: also_of(placed, now[-1])))
    fs = now[-1]
    last = list(fs.run())[-1]
    if not at_stop:
        return None, fs.base
    assert last.stopped and not last.finished and last.in_flight == 0 and last.also_in_flight == 0
    now.append(FrontierSearch(search, Store(home), fs.base, batch=slots, also=lambda placed: also_of(placed, now[-1])))
    again = now[-1].read()
    assert last.probes_left == again.probes_left, (frontiers, slots, stop_after)
    assert [b.rank for b in fs.unsettled()] == [b.rank for b in now[-1].unsettled()]
    return at_stop[0], fs.base


def test_a_search_stopped_with_points_beside_it_in_training_reads_back_the_same(tiny_model_dir, home, monkeypatch):
    """Stopped at any point, points beside the search in training (some awaited by a bracket) included, the search
    that stopped and a fresh one reading the same store agree on the probes left and the brackets unsettled, and
    nothing counts as in training."""
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1, 2), seeds=(0, 1, 2), start_length=32,
                        max_length=96, name="beside-stopped")
    base, awaited = None, []
    for rank2 in [(70, 82, 75), (75, 75, 75)]:
        frontiers = {(1, 0): 40, (1, 1): 44, (1, 2): 37, **{(2, s): f for s, f in enumerate(rank2)}}
        for slots in (3, 4):
            for stop_after in range(2, 32, 3):
                n, base = _stop_beside(search, frontiers, slots, stop_after, base, home, monkeypatch)
                awaited.append(n)
    assert any(awaited)  # some stops came while a bracket awaited a point beside the search


def _collide(fs):
    """Points beside the search where it may ask next: every seed at the length each bracket waits on, at both
    lengths it may go to next, and at its ends."""
    import copy

    out = []
    for b in fs.brackets:
        waiting = fs.waiting.get((b.method, b.rank))
        lengths = [b.lo, b.hi]
        if waiting is not None:
            lengths.append(waiting)
            for recalled in (True, False):
                nxt = copy.deepcopy(b)
                nxt.record(waiting, recalled=recalled)
                lengths += [nxt.next_length(fs.search, fs.longest), nxt.lo, nxt.hi]
        out += [(b.method, b.rank, n, s) for n in lengths if n is not None for s in fs.search.seeds]
    return out


def test_points_beside_the_search_where_it_probes_keep_the_probes_to_go_true(tiny_model_dir, home, monkeypatch):
    """Points beside the search that land where it probes (the length it waits on, its next lengths, its ends):
    at every step the probes to go bound the verdicts still to come, the brackets are the ones it gives alone, and
    a search stopped midway agrees with a fresh read of its store (random frontiers, seeds and slots)."""
    import random

    import memcore.runner

    rng = random.Random(0)
    base = None
    for case in range(24):
        seeds = tuple(sorted(rng.sample(range(5), rng.randint(2, 3))))
        methods = ("sft", "memft-ot")[:rng.randint(1, 2)]
        frontiers = {(m, s): rng.choice([12, 20, 26, 33, 40]) for m in methods for s in seeds}
        search = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=seeds, methods=methods,
                            start_length=32, max_length=64, resolution=rng.choice([0.1, 0.5]), name=f"collide{case}")
        slots = rng.randint(2, 5)

        frontiers = {(m, 1, s): f for (m, s), f in frontiers.items()}
        monkeypatch.setattr(memcore.runner, "execute_many", _oracle_points(frontiers, slots, order=[]))
        alone = FrontierSearch(search, Store(home / f"a{case}"), base, batch=slots)
        base = alone.base
        list(alone.run())
        now = []
        now.append(FrontierSearch(search, Store(home / f"b{case}"), base, batch=slots,
                                  also=lambda _, now=now: _collide(now[0])))
        seen = [(p.probes_done, p.probes_left) for p in now[0].run()]
        done = seen[-1][0]
        for at, (few, most) in seen:
            assert few <= done - at <= most, (case, at, few, most, done)
        assert [(b.lo, b.hi) for b in now[0].brackets] == [(b.lo, b.hi) for b in alone.brackets], case
        assert [sorted(now[0].brackets[i].probed[end]) for i, b in enumerate(alone.brackets)
                for end in (b.lo, b.hi) if end is not None] == [list(seeds)] * sum(
            end is not None for b in alone.brackets for end in (b.lo, b.hi))
        stopped = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=seeds, methods=methods,
                             start_length=32, max_length=64, resolution=search.resolution, name=f"collide-stop{case}")
        _stop_beside(stopped, frontiers, slots, rng.randint(2, 14), base, home / f"c{case}", monkeypatch,
                     also_of=lambda placed, fs: _collide(fs))


def test_a_point_beside_the_search_in_training_is_reported_as_it_goes(tiny_model_dir, home, monkeypatch):
    """While only points beside the search train (its own probes done), progress still comes every
    PROGRESS_EVERY_S, so a caller keeping checkpoints (the benchmarks' kept folders) keeps theirs too."""
    from types import SimpleNamespace

    import memcore.runner
    import memcore.search

    def fake(runs, store, base, *, slots, max_rank=1, should_stop=None):
        for run in runs:
            if run is None:
                continue
            tag = run.tag
            length, seed = (tag.point[2], tag.point[3]) if hasattr(tag, "point") else (tag.length, tag.seed)
            if hasattr(tag, "point"):  # a long point: three reports before its last
                for step in (10, 20, 30):
                    yield tag, SimpleNamespace(final=False, step=step, summary=None)
            summary = SimpleNamespace(exact_recall=length <= 40, steps=40, status="completed")
            yield tag, SimpleNamespace(final=True, step=40, summary=summary)

    monkeypatch.setattr(memcore.runner, "execute_many", fake)
    monkeypatch.setattr(memcore.search, "PROGRESS_EVERY_S", 0.0)
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=(0,), start_length=32, max_length=96,
                        name="reported")
    fs = FrontierSearch(search, Store(home), batch=1, also=lambda placed: [("sft", 1, 20, 0)] if placed else [])
    seen = [(p.also_in_flight, p.also_done, p.steps) for p in fs.run()]
    training = [s for s in seen if s[0] == 1 and s[1] == 0]
    assert len(training) >= 3  # said while it trained, with its steps so far
    assert [s[2] for s in training][-3:] == sorted(s[2] for s in training)[-3:]
    assert seen[-1][:2] == (0, 1)


def test_points_beside_the_search_on_runs_of_their_own_never_stand_in_for_its_probes(tiny_model_dir, home,
                                                                                      monkeypatch):
    """`also_run`: points beside the search trained on another rule (their own spec and label) where the search
    probes train beside its probes, not instead of them: the search trains every probe it trains alone and gives
    the same brackets, and each such point trains once."""
    import json
    from dataclasses import replace

    import memcore.runner

    frontiers = {(m, 1, s): f for m in ("sft",) for s, f in enumerate((40, 44, 37))}
    search = SearchSpec(template=_template(tiny_model_dir), ranks=(1,), seeds=(0, 1, 2), start_length=32,
                        max_length=64, name="own-runs")
    alone_order, order = [], []
    monkeypatch.setattr(memcore.runner, "execute_many", _oracle_points(frontiers, slots=3, order=alone_order))
    alone = FrontierSearch(search, Store(home / "a"), batch=3)
    list(alone.run())

    def own(point):
        spec = search.probe_spec(*point)
        label = json.dumps({**json.loads(search.label(*point)), "until": "budget"}, sort_keys=True)
        return replace(spec, train=replace(spec.train, until="budget")), label

    fake, started = _oracle_points(frontiers, slots=3, order=order), []

    def recording(runs, *args, **kwargs):  # the runs as started, with their spec and label
        def seen():
            for run in runs:
                if run is not None:
                    started.append(run)
                yield run
        yield from fake(seen(), *args, **kwargs)

    monkeypatch.setattr(memcore.runner, "execute_many", recording)
    now = []
    now.append(FrontierSearch(search, Store(home / "b"), batch=3, also=lambda _: _collide(now[0]), also_run=own))
    list(now[0].run())
    fs = now[0]
    assert [(b.lo, b.hi, b.probed) for b in fs.brackets] == [(b.lo, b.hi, b.probed) for b in alone.brackets]
    assert sorted(o for o in order if o[0] == "probe") == sorted(alone_order)  # every probe trained by the search
    beside = [o[1:] for o in order if o[0] == "also"]
    assert len(beside) == len(set(beside))  # each point beside it once
    assert set(beside) & {o[1:] for o in order if o[0] == "probe"}  # and some where the search probed too
    for run in started:  # trained on their own rule and label, the probes on the search's
        own_run = hasattr(run.tag, "point")
        assert (run.spec.train.until == "budget") == own_run and ('"until": "budget"' in run.label) == own_run
