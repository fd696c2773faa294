"""Sweeps: every point a run in the store; an interrupted sweep re-run completes only the missing points."""

import json

import pytest

from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec
from memcore.store import Store
from memcore.sweep import SweepSpec, points, run_sweep, sweep_table


@pytest.fixture
def sweep(tiny_model_dir):
    base = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), adapter=AdapterSpec(rank=1, layers="paper"),
                   data=DataSpec(text="one two three four five six seven eight nine ten eleven twelve "
                                      "thirteen fourteen"),
                   train=TrainSpec(max_steps=2, lr=1e-2))
    return SweepSpec(template=base, ranks=(1, 2), lengths=(4, 8), methods=("sft", "memft-ot"), name="t")


def test_points_cover_the_grid_with_a_fixed_budget(sweep):
    pts = points(sweep)
    assert len(pts) == 8 and len({p.key for p in pts}) == 8
    assert all(not p.spec.train.stop_when_recalled and not p.spec.train.verify for p in pts)
    assert {(p.values["rank"], p.values["length"], p.values["method"]) for p in pts} == {
        (r, n, m) for r in (1, 2) for n in (4, 8) for m in ("sft", "memft-ot")}


def test_interrupted_sweep_resumes_with_only_the_missing_points(sweep, home):
    store = Store(home)
    finished = []
    stop = {"after": 3}

    def should_stop():
        return len(finished) >= stop["after"]

    for s in run_sweep(sweep, store, should_stop=should_stop):
        finished.append(s)
    assert len(finished) == 3
    assert len(sweep_table(store, "t")) == 3
    rerun = list(run_sweep(sweep, store))
    assert len(rerun) == 5  # only the missing points
    rows = sweep_table(store, "t")
    assert len(rows) == 8 and len({(r["rank"], r["length"], r["method"]) for r in rows}) == 8
    for r in rows:
        assert r["length"] in (4, 8) and r["steps"] == 2 and r["p_eff"] > 0
    assert list(run_sweep(sweep, store)) == []  # nothing left to do
    labels = [json.loads(r["label"]) for r in store.runs(sweep="t")]
    assert len(labels) == 8


def test_same_seed_gives_the_same_point(sweep, home):
    store = Store(home)
    one = SweepSpec(template=sweep.template, ranks=(2,), lengths=(8,), methods=("sft",), name="a")
    two = SweepSpec(template=sweep.template, ranks=(2,), lengths=(8,), methods=("sft",), name="b")
    a, b = next(run_sweep(one, store)), next(run_sweep(two, store))
    assert a.summary.delta_loss == b.summary.delta_loss and a.run_id != b.run_id


def test_lengths_beyond_the_text_are_refused(sweep, home):
    too_long = SweepSpec(template=sweep.template, ranks=(1,), lengths=(500,), methods=("sft",), name="x")
    with pytest.raises(MemcoreError, match="asks for 500 target tokens but the text has only"):
        list(run_sweep(too_long, Store(home)))
    with pytest.raises(MemcoreError, match="unknown method"):
        SweepSpec(template=sweep.template, methods=("adam",))


def test_ray_backend_without_ray_says_how_to_install(sweep, home, monkeypatch):
    import memcore.sweep_ray as sr

    monkeypatch.setattr(sr, "ray_available", lambda: False)
    with pytest.raises(MemcoreError, match=r"pip install 'memcore\[ray\]'"):
        list(sr.run_sweep_ray(sweep, Store(home)))


def test_a_point_cut_off_mid_way_continues_from_its_checkpoint(sweep, home):
    store = Store(home)
    base = RunSpec(model=sweep.template.model, adapter=sweep.template.adapter, data=sweep.template.data,
                   train=TrainSpec(max_steps=10, lr=1e-2))
    one = SweepSpec(template=base, ranks=(2,), lengths=(8,), methods=("sft",), name="mid")
    calls = iter(range(1000))
    assert list(run_sweep(one, store, should_stop=lambda: next(calls) >= 5)) != []  # the point stops after 4 updates
    (cut,) = store.runs(sweep="mid")
    assert cut["status"] == "stopped"
    (done,) = list(run_sweep(one, store))
    assert done.run_id == cut["id"] and done.summary.steps == 10  # the same run, continued
    assert [s.step for s in store.steps(cut["id"])] == list(range(11))
    assert len(sweep_table(store, "mid")) == 1


def test_snapshot_schedule_is_bounded_and_denser_early():
    from memcore.runner import snapshot_steps

    kept = snapshot_steps(2000)
    assert len(kept) <= 300 and {0, 2000} <= kept
    early, late = sum(s < 200 for s in kept), sum(s >= 1800 for s in kept)
    assert early > 3 * late > 0
    assert snapshot_steps(120) == frozenset(range(121))  # a short budget keeps every step


def test_a_decimated_history_keeps_every_scalar_and_replays_its_snapshots(sweep, home, monkeypatch):
    import memcore.runner as runner

    monkeypatch.setattr(runner, "HISTORY_SNAPSHOTS", 10)
    store = Store(home)
    base = RunSpec(model=sweep.template.model, adapter=sweep.template.adapter, data=sweep.template.data,
                   train=TrainSpec(max_steps=40, lr=1e-2, history="decimated"))
    (point,) = run_sweep(SweepSpec(template=base, ranks=(2,), lengths=(8,), methods=("memft-ot",), name="dec"), store)
    run_id = point.run_id
    assert [s.step for s in store.steps(run_id)] == list(range(41))  # loss, ΔL, counts: every step
    replay = store.replay(run_id)
    assert len(replay.steps) <= 10 and replay.steps[0] == 0 and replay.steps[-1] == 40
    assert replay.steps == sorted(replay.steps) and replay.p.shape == (len(replay.steps), 8)
    summary = store.run(run_id)["summary"]
    assert summary.history == "decimated" and summary.snapshots == len(replay.steps)
    # the final snapshot is the run's final state
    assert int((replay.p[-1] > 0.5).sum()) == summary.n_above


def test_sweep_id_ignores_how_points_are_run(sweep):
    from dataclasses import replace

    other = replace(sweep, template=replace(sweep.template, train=replace(sweep.template.train, history="decimated",
                                                                          recompute="on")))
    assert SweepSpec(template=other.template, ranks=sweep.ranks, lengths=sweep.lengths).id == \
        SweepSpec(template=sweep.template, ranks=sweep.ranks, lengths=sweep.lengths).id


def test_every_grid_axis_and_the_template_change_the_sweep_id(sweep):
    from dataclasses import replace

    ids = {sweep.id, replace(sweep, name=None).id}
    unnamed = replace(sweep, name=None)
    variants = [replace(unnamed, ranks=(1, 4)), replace(unnamed, lengths=(4, 16)), replace(unnamed, methods=("sft",)),
                replace(unnamed, seeds=(1,)), replace(unnamed, noises=(0.5,)),
                replace(unnamed, template=replace(sweep.template, train=replace(sweep.template.train, lr=0.5)))]
    assert len({v.id for v in variants} | ids) == len(variants) + 2  # one sweep, one id; another grid, another


def test_a_batched_sweep_lands_the_same_points_as_one_at_a_time(sweep, home, tmp_path):
    """--batch 3: the same grid through three slots gives every point the numbers it gets alone, records each as an
    ordinary run of the sweep, and a stopped batched sweep resumes only what is missing."""
    alone, together = Store(tmp_path / "alone"), Store(home)
    list(run_sweep(sweep, alone, batch=1))
    finished = []
    for s in run_sweep(sweep, together, batch=3, should_stop=lambda: len(finished) >= 2):
        if not s.stopped:
            finished.append(s)
    rerun = [s for s in run_sweep(sweep, together, batch=3) if not s.stopped]
    assert len(finished) + len(rerun) == 8
    a = {(r["rank"], r["length"], r["method"]): r for r in sweep_table(alone, "t")}
    b = {(r["rank"], r["length"], r["method"]): r for r in sweep_table(together, "t")}
    assert a.keys() == b.keys() and len(b) == 8
    for k in a:
        assert b[k]["delta_loss"] == pytest.approx(a[k]["delta_loss"], rel=1e-4, abs=1e-6), k
        assert b[k]["p_eff"] == a[k]["p_eff"] and b[k]["steps"] == 2
    rid = b[(2, 8, "memft-ot")]["run_id"]
    assert (together.adapter_dir(rid) / "adapter_model.safetensors").is_file()
    assert together.replay(rid).p.shape[1] == 8


def test_a_batched_lora_point_saves_a_stock_peft_adapter_that_gives_its_recorded_probabilities(
        sweep, home, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = Store(home)
    list(run_sweep(sweep, store, batch=4))
    rows = {(r["rank"], r["length"], r["method"]): r for r in sweep_table(store, "t")}
    for key in [(2, 8, "memft-ot"), (1, 4, "sft")]:
        rid = rows[key]["run_id"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          store.adapter_dir(rid)).eval()
        toks = store.tokens(rid)
        prompt, target = toks["prompt_ids"][0], toks["target_ids"][0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1].float()
        p = torch.softmax(logits, -1).gather(1, torch.tensor(target)[:, None])[:, 0].numpy()
        recorded = store.replay(rid).p[-1]
        assert p == pytest.approx(recorded.astype(float), abs=2e-3), key


def test_settings_added_later_leave_a_sweeps_id_alone_while_at_their_default():
    """A sweep (or frontier search) stored before --plateau-on and --batch-size existed keeps its id, so the same
    command resumes it; setting one of them names another sweep."""
    import hashlib
    import json
    from dataclasses import replace

    from memcore.config import DataSpec, RunSpec, TrainSpec
    from memcore.sweep import ADDED_AT_DEFAULT, HOW_NOT_WHAT, SweepSpec

    template = RunSpec(data=DataSpec(random_tokens=64), train=TrainSpec(max_steps=30, until="converged"))
    sweep = SweepSpec(template=template, ranks=(1, 2), lengths=(16, 32))
    old = template.to_dict()  # as the id was built before the new settings: without them
    for name in (*HOW_NOT_WHAT, *ADDED_AT_DEFAULT):
        old["train"].pop(name, None)
    d = {"base": old, "ranks": sweep.ranks, "lengths": sweep.lengths, "methods": sweep.methods, "seeds": sweep.seeds,
         "noises": sweep.noises}
    assert sweep.id == "sweep-" + hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
    other = SweepSpec(template=replace(template, train=replace(template.train, plateau_on="recall")), ranks=(1, 2),
                      lengths=(16, 32))
    assert other.id != sweep.id
