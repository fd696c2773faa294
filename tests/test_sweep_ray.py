"""The Ray backend on a local Ray instance started here (2 CPUs): same points and results as the local
backend; a failing point ends as failed after its retries while the others complete."""

import json
import sys

import pytest

ray = pytest.importorskip("ray")

from memcore.config import AdapterSpec, DataSpec, ModelSpec, RunSpec, TrainSpec  # noqa: E402
from memcore.store import Store  # noqa: E402
from memcore.sweep import SweepSpec, run_sweep, sweep_table  # noqa: E402
from memcore.sweep_ray import run_sweep_ray, train_points  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder
    yield
    ray.shutdown()


@pytest.fixture
def sweep(tiny_model_dir):
    base = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), adapter=AdapterSpec(rank=1, layers="paper"),
                   data=DataSpec(text="one two three four five six seven eight nine ten eleven twelve"),
                   train=TrainSpec(max_steps=3, lr=1e-2))
    return SweepSpec(template=base, ranks=(1, 2), lengths=(4, 8), methods=("sft",), name="ray-test")


def fails_for_rank_2_length_8(spec_dicts, sweep_id, keys):
    if any(json.loads(k) == {"length": 8, "method": "sft", "noise": 0.0, "rank": 2, "seed": 0} for k in keys):
        raise RuntimeError("injected failure")
    return train_points(spec_dicts, sweep_id, keys)


def _by_point(rows):
    return {(r["rank"], r["length"], r["method"]): r for r in rows}


def test_ray_sweep_matches_the_local_backend(local_ray, sweep, tmp_path):
    local, remote = Store(tmp_path / "local"), Store(tmp_path / "ray")
    list(run_sweep(sweep, local))
    got = list(run_sweep_ray(sweep, remote, retries=0))
    assert len(got) == 4 and not any(g.error for g in got)
    a, b = _by_point(sweep_table(local, "ray-test")), _by_point(sweep_table(remote, "ray-test"))
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert b[k]["delta_loss"] == pytest.approx(a[k]["delta_loss"], rel=1e-3, abs=1e-5)
        assert b[k]["p_eff"] == a[k]["p_eff"] and b[k]["steps"] == 3
    # the imported runs are whole: replayable, and their adapters are on the driver's disk
    rid = b[(2, 8, "sft")]["run_id"]
    assert remote.replay(rid).p.shape == (4, 8)
    assert (remote.adapter_dir(rid) / "adapter_model.safetensors").is_file()
    assert remote.run(rid)["summary"].adapter_dir.startswith(str(remote.runs_dir))
    assert list(run_sweep_ray(sweep, remote)) == []  # re-running skips completed points
    # each task training two points together lands the same numbers
    batched = Store(tmp_path / "ray-batched")
    got = list(run_sweep_ray(sweep, batched, retries=0, batch=2))
    assert len(got) == 4 and not any(g.error for g in got)
    c = _by_point(sweep_table(batched, "ray-test"))
    for k in a:
        assert c[k]["delta_loss"] == pytest.approx(a[k]["delta_loss"], rel=1e-3, abs=1e-5)


def test_failing_point_is_recorded_after_retries_and_the_rest_complete(local_ray, sweep, tmp_path):
    store = Store(tmp_path / "s")
    got = list(run_sweep_ray(sweep, store, retries=1, task=fails_for_rank_2_length_8))
    failed = [g for g in got if g.error]
    assert len(got) == 4 and len(failed) == 1 and "injected failure" in failed[0].error and failed[0].summary is None
    runs = store.runs(sweep="ray-test")
    assert sorted(r["status"] for r in runs) == ["completed", "completed", "completed", "failed"]
    bad = next(r for r in runs if r["status"] == "failed")
    assert "after 1 retries" in bad["error"] and "injected failure" in bad["error"]
    # a re-run retries only the failed point
    again = list(run_sweep_ray(sweep, store, retries=0))
    assert len(again) == 1 and again[0].values["rank"] == 2 and again[0].values["length"] == 8 and not again[0].error


def test_a_chain_sweep_on_ray_lands_the_same_chains_as_here(local_ray, tiny_model_dir, tmp_path):
    """Each second passage's task carries its first passage's run to the worker (which has no share of the driver's
    disk): the chains land in the driver's store, on top of the right first run, with the numbers of a local run."""
    from memcore.chain_sweep import ChainSweepSpec, chain_table, run_chain_sweep

    template = RunSpec(model=ModelSpec(name=str(tiny_model_dir)), adapter=AdapterSpec(rank=2, layers="all"),
                       data=DataSpec(random_tokens=6), train=TrainSpec(max_steps=3, lr=2e-2))
    sweep = ChainSweepSpec(template=template, ranks=(2,), first_lengths=(6,), second_lengths=(3,),
                           strategies=("none", "keep-memft-ot"), seeds=(0,), name="ray-chains")
    local, remote = Store(tmp_path / "local"), Store(tmp_path / "ray")
    list(run_chain_sweep(sweep, local, batch=1))
    got = list(run_chain_sweep(sweep, remote, batch=1, ray={"retries": 0}))
    assert len(got) == 3 and not any(r.error for _, r in got)
    a = {r["strategy"]: r for r in chain_table(local, "ray-chains")}
    b = {r["strategy"]: r for r in chain_table(remote, "ray-chains")}
    assert a.keys() == b.keys() == {"none", "keep-memft-ot"}
    firsts = [r["id"] for r in remote.runs(sweep="ray-chains") if r["summary"].after is None]
    for strategy, row in b.items():
        assert row["first_run"] == firsts[0]  # chained on the first passage imported from its own task
        assert row["retained_above"] == pytest.approx(a[strategy]["retained_above"])
        assert row["rehearsal_share"] == pytest.approx(a[strategy]["rehearsal_share"], abs=1e-4)
        assert remote.earlier_steps(row["run_id"], with_tokens=True)  # the earlier targets measured every step
    assert b["keep-memft-ot"]["rehearsal_share"] > 0 and b["none"]["rehearsal_share"] == 0
    assert list(run_chain_sweep(sweep, remote, ray={"retries": 0})) == []  # resumes: nothing left
