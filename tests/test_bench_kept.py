"""A benchmark's points kept beside the repository (bench/kept.py): a fresh store resumes from them as from its own."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec
from memcore.search import FrontierSearch, SearchSpec
from memcore.store import Store
from memcore.sweep import sweep_table

ROOT = Path(__file__).resolve().parent.parent


def _kept():
    spec = importlib.util.spec_from_file_location("kept", ROOT / "bench" / "kept.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _search(model_dir):
    template = RunSpec(model=ModelSpec(name=str(model_dir)),
                       adapter=AdapterSpec(kind="bypass", rank=1, layers="paper", dropout=0.0),
                       data=DataSpec(random_tokens=96),
                       train=TrainSpec(max_steps=40, lr=0.1, checkpoint_every=0, history="decimated"))
    return SearchSpec(template=template, ranks=(1,), seeds=(0, 1), start_length=4, name="kept")


def test_a_fresh_store_resumes_a_search_from_its_kept_points_and_trains_nothing(tiny_model_dir, tmp_path):
    kept = _kept()
    folder = tmp_path / "kept_runs"
    first = Store(tmp_path / "a")
    search = _search(tiny_model_dir)
    done = list(FrontierSearch(search, first).run())[-1]
    assert done.finished
    n = kept.keep_new(first, "kept", folder)
    assert n == len(first.runs(sweep="kept", status="completed")) > 0
    assert kept.keep_new(first, "kept", folder) == 0  # each point written once
    only = kept.keep_new(first, "kept", tmp_path / "seed1", seeds={1})  # a spot re-run keeps its own seeds only
    assert only == len(first.runs(sweep="kept", status="completed")) - len([r for r in first.runs(sweep="kept",
                                                                        status="completed") if r["seed"] != 1])
    assert 0 < only < n

    fresh = Store(tmp_path / "b")
    assert kept.restore(fresh, folder) == n
    assert kept.restore(fresh, folder) == 0  # nothing imported twice
    again = FrontierSearch(search, fresh)
    last = list(again.run())[-1]
    assert last.finished and last.probes_done == done.probes_done
    assert len(fresh.runs(sweep="kept")) == n  # every verdict came from the kept points: nothing trained
    assert [(b.lo, b.hi, b.probed) for b in last.brackets] == [(b.lo, b.hi, b.probed) for b in done.brackets]

    def table(store):
        return sorted((r["method"], r["rank"], r["length"], r["seed"], r["steps"], r["exact_recall"],
                       round(r["delta_loss"], 6)) for r in sweep_table(store, "kept"))

    assert table(fresh) == table(first)
    rid = first.runs(sweep="kept")[0]["id"]
    assert fresh.tokens(rid)["target_ids"] == first.tokens(rid)["target_ids"]  # bytes and all
    assert [s.n_above for s in fresh.steps(rid)] == [s.n_above for s in first.steps(rid)]


def test_a_broken_kept_file_is_named_and_nothing_is_imported_from_it(tmp_path):
    kept = _kept()
    folder = tmp_path / "kept_runs"
    folder.mkdir()
    (folder / "abc.json.gz").write_bytes(b"not gzip")
    store = Store(tmp_path / "a")
    with pytest.raises(ValueError, match="abc.json.gz"):
        kept.restore(store, folder)
    assert store.runs() == []
    with gzip.open(folder / "abc.json.gz", "wt") as f:
        json.dump({"tables": {}}, f)
    with pytest.raises(ValueError, match="not a kept run"):
        kept.restore(store, folder)


def test_the_ledger_adds_the_wall_time_of_every_invocation(tmp_path, monkeypatch):
    kept = _kept()
    clock = iter([100.0, 130.0, 200.0, 205.0])
    monkeypatch.setattr(kept.time, "time", lambda: next(clock))
    one = kept.Ledger(tmp_path, "python bench/x.py run")
    one.tick()
    two = kept.Ledger(tmp_path, "python bench/x.py run --ranks 4")
    two.tick()
    data = json.loads((tmp_path / "kept.json").read_text())
    assert data["wall_s"] == 35.0 and data["invocations"] == 2 and data["command"].endswith("--ranks 4")


def test_the_ledger_keeps_each_recent_invocation_s_wall_time_and_the_work_its_points_advanced(tmp_path, monkeypatch):
    kept = _kept()
    clock = iter([1000.0, 1600.0, 2200.0, 5000.0, 5100.0])
    monkeypatch.setattr(kept.time, "time", lambda: next(clock))
    one = kept.Ledger(tmp_path, "python bench/x.py run")
    one.first_work = 5000.0  # what the store held when it began
    one.tick(work=8000.0)
    one.tick(work=9500.0)  # 4,500 length-steps in 1,200 s
    two = kept.Ledger(tmp_path, "python bench/x.py run")
    two.first_work = 9000.0  # resumed from checkpoints a little behind
    two.tick(work=8900.0)  # never below nothing done
    data = json.loads((tmp_path / "kept.json").read_text())
    assert [(r["wall_s"], r["work"]) for r in data["recent"]] == [(1200.0, 4500.0), (100.0, 0.0)]
    assert data["wall_s"] == 1300.0 and data["invocations"] == 2
    for _ in range(kept.RECENT + 3):  # only the latest are kept
        clock = iter([0.0, 1.0])
        kept.Ledger(tmp_path, "python bench/x.py run").tick()
    assert len(json.loads((tmp_path / "kept.json").read_text())["recent"]) == kept.RECENT


def test_an_invocation_s_work_is_counted_in_the_search_s_own_unit(tmp_path):
    """A PhoneBook's points are costed in entries (its label's length), not in the tokens the store also holds, so
    the recent pace and the report's costing agree."""
    from types import SimpleNamespace

    kept = _kept()
    runs = [{"label": json.dumps({"length": 23, "method": "sft"}), "length": 253, "steps": 600},
            {"label": "not json", "length": 40, "steps": 10}]
    keeper = kept.Keeper(SimpleNamespace(runs=lambda sweep=None: runs), "s", tmp_path, "bench/x.py", ["run"], 0.0)
    assert keeper._work() == 23 * 600 + 40 * 10 == keeper.ledger.first_work


def test_the_kept_command_leaves_out_where_this_machine_kept_its_store():
    kept = _kept()
    assert kept.command_of("bench/bench_memft.py", ["run", "--home", "/root/x", "--ranks", "1", "2",
                                                    "--keep=/tmp/k"]) == "python bench/bench_memft.py run --ranks 1 2"


def test_a_point_cut_off_mid_training_resumes_from_its_kept_checkpoint_in_a_fresh_store(tiny_model_dir, tmp_path):
    from memcore.sweep import resumable_points

    kept = _kept()
    folder = tmp_path / "kept_runs"
    search = _search(tiny_model_dir)
    first = Store(tmp_path / "a")
    calls = []

    def stop():  # cut the first probes off a few steps in
        calls.append(1)
        return len(calls) > 12

    assert list(FrontierSearch(search, first, should_stop=stop).run())[-1].stopped
    kept.keep_new(first, "kept", folder)
    cut = {p.name.removesuffix(".json.gz") for p in (folder / "in_flight").glob("*.json.gz")}
    assert cut and cut == set(resumable_points(first, "kept").values())

    fresh = Store(tmp_path / "b")
    kept.restore(fresh, folder)
    assert set(resumable_points(fresh, "kept").values()) == cut  # interrupted, each with its checkpoint
    steps_before = {rid: fresh.run(rid)["steps"] for rid in cut}
    assert all(s > 0 for s in steps_before.values())
    last = list(FrontierSearch(search, fresh).run())[-1]
    assert last.finished
    resumed = [r for r in fresh.runs(sweep="kept", status="completed") if r["id"] in cut]
    assert len(resumed) == len(cut)  # the same runs went on; none started over under a new id
    assert all(fresh.steps(r["id"])[0].step <= 1 for r in resumed)  # their early steps came back with them

    never_cut = Store(tmp_path / "c")
    whole = list(FrontierSearch(search, never_cut).run())[-1]
    assert [(b.lo, b.hi) for b in last.brackets] == [(b.lo, b.hi) for b in whole.brackets]

    kept.keep_new(fresh, "kept", folder)
    assert not list((folder / "in_flight").glob("*.json.gz"))  # finished: their checkpoints are dropped
    again = Store(tmp_path / "d")
    kept.restore(again, folder)
    assert resumable_points(again, "kept") == {}

    # the store that was cut off takes the finished points over its own stopped copies and trains nothing again
    kept.restore(first, folder)
    assert resumable_points(first, "kept") == {} and all(first.run(rid)["status"] == "completed" for rid in cut)
    n_first = len(first.runs(sweep="kept"))
    assert list(FrontierSearch(search, first).run())[-1].finished and len(first.runs(sweep="kept")) == n_first


def test_a_signal_asks_for_a_clean_stop_and_an_ignored_ctrl_c_stays_ignored():
    import os
    import signal

    kept = _kept()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a job started in the background has it
        stop = kept.StopOnSignal()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()  # the run ends after this step instead of dying in it
        assert signal.getsignal(signal.SIGTERM) == saved[signal.SIGTERM]  # a second one does what it did before
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_finished_experiment_drops_the_checkpoints_nothing_will_resume(tmp_path):
    """A later seed held back while it trained, whose length the search never needed again, leaves its checkpoint
    under in_flight/; once the experiment runs to its end nothing resumes it, so it is removed (and said), while a
    stopped invocation keeps every checkpoint."""
    import time

    kept = _kept()
    folder = tmp_path / "kept_runs"
    (folder / "in_flight").mkdir(parents=True)
    stale = folder / "in_flight" / "20261201-000000-abcdef.json.gz"
    stale.write_bytes(b"x")
    store = Store(tmp_path / "home")
    keeper = kept.Keeper(store, "kept", folder, "bench/bench_memft.py", ["run"], time.perf_counter())
    assert keeper.ended(stopped=True).startswith("stopped after") and stale.exists()
    line = keeper.ended(stopped=False)
    assert not stale.exists() and not (folder / "in_flight").exists()
    assert line.startswith("done in") and "1 stale checkpoint of held-back seeds removed" in line
