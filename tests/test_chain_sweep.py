"""`memcore sweep --chain`: first passages, then second ones on top of them under each strategy, resumable, and the
first passage's retention against capacity."""

import json

import pandas as pd
import pytest

from memcore.chain_sweep import ChainSweepSpec, chain_table, retention_against_capacity
from memcore.cli import main
from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec
from memcore.store import Store


def _cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_chain_sweep_trains_each_first_passage_once_then_every_chain_on_it_and_resumes(home, tiny_model_dir, capsys,
                                                                                       tmp_path):
    out = tmp_path / "chains.csv"
    args = ["sweep", "--chain", "--model", str(tiny_model_dir), "--ranks", "2", "4", "--first-lengths", "6",
            "--lengths", "3", "9", "--seeds", "0", "--max-steps", "3", "--lr", "2e-2", "--layers", "all",
            "--name", "chains-test", "--out", str(out), "--first-method", "sft"]
    code, _, err = _cli(capsys, *args)
    assert code == 0 and "14 runs (2 first passages, 12 chains)" in err
    # 3 steps do not teach the tiny model a first passage: said, since those chains retain nothing learned
    assert "2 first passage(s) were not recalled when their own run ended" in err
    store = Store(home)
    runs = store.runs(sweep="chains-test", status="completed")
    assert len(runs) == 2 + 12  # a first per rank and seed; a chain per first, second length and strategy
    firsts = {r["id"]: r for r in runs if json.loads(r["label"])["passage"] == "first"}
    chains = [r for r in runs if json.loads(r["label"])["passage"] == "second"]
    assert len(firsts) == 2 and len(chains) == 12
    assert {f["method"] for f in firsts.values()} == {"sft"}  # --first-method
    for c in chains:
        v, spec = json.loads(c["label"]), c["spec"]
        first = firsts[spec["train"]["after"]]  # on top of its own first passage: same rank and seed
        fv = json.loads(first["label"])
        assert (fv["rank"], fv["seed"]) == (v["rank"], v["seed"]) and spec["adapter"]["rank"] == v["rank"]
        method, keep = {"none": ("sft", False), "keep-sft": ("sft", True), "keep-memft-ot": ("memft-ot", True)}[
            v["strategy"]]
        assert (spec["train"]["method"], spec["train"]["keep"]) == (method, keep)
        mine, theirs = store.tokens(c["id"]), store.tokens(first["id"])
        assert mine["prompt_ids"] != theirs["prompt_ids"]  # a prompt of its own
        assert mine["target_ids"][0][:3] != theirs["target_ids"][0][:3]  # other random tokens
        assert len(mine["target_ids"][0]) == v["second_length"] and len(theirs["target_ids"][0]) == 6
    table = pd.read_csv(out)
    assert len(table) == 12 and set(table["strategy"]) == {"none", "keep-sft", "keep-memft-ot"}
    assert set(table["second_length"]) == {3, 9} and (table["first_length"] == 6).all()
    assert (table.loc[table["strategy"] == "none", "rehearsal_share"] == 0).all()
    assert (table.loc[table["strategy"] == "keep-sft", "rehearsal_share"] > 0).all()
    rows = {r["run_id"]: r for r in chain_table(store, "chains-test")}
    for c in chains:
        s = c["summary"]
        assert rows[c["id"]]["retained_above"] == pytest.approx(s.earlier_above / 6)
    code, _, err = _cli(capsys, *args)  # the same command again: nothing left to train
    assert code == 0 and "14 already completed, 0 to run" in err
    assert len(store.runs(sweep="chains-test")) == 14


@pytest.mark.parametrize("args, message", [
    (["--text", "some words"], "--text does not apply with --chain"),
    (["--methods", "sft"], "--methods and --noises do not apply with --chain"),
    (["--strategies", "forget"], "unknown strategy 'forget'"),
])
def test_a_chain_sweep_refuses_what_it_cannot_do(home, tiny_model_dir, capsys, args, message):
    code, _, err = _cli(capsys, "sweep", "--chain", "--model", str(tiny_model_dir), *args)
    assert code != 0 and message in err


def test_chain_flags_need_chain(home, tiny_model_dir, capsys):
    code, _, err = _cli(capsys, "sweep", "--model", str(tiny_model_dir), "--strategies", "none")
    assert code != 0 and "--strategies applies only with --chain" in err
    code, _, err = _cli(capsys, "sweep", "--model", str(tiny_model_dir), "--first-method", "sft")
    assert code != 0 and "--first-method applies only with --chain" in err


def test_a_chain_sweep_draws_random_tokens_only():
    template = RunSpec(model=ModelSpec(), adapter=AdapterSpec(), data=DataSpec(text="words"), train=TrainSpec())
    with pytest.raises(MemcoreError, match="random tokens"):
        ChainSweepSpec(template=template)


def test_retention_against_capacity_counts_only_learned_first_passages():
    """Means over the seeds whose first passage was recalled, fill = (ℓ_A + ℓ_B)/ℓ*(r), the seeds' least and most."""
    rows = []
    for seed, (first_ok, kept, rec) in enumerate([(True, 1.0, True), (True, 0.5, False), (False, 0.0, False)]):
        rows.append({"rank": 2, "first_length": 20, "second_length": 60, "strategy": "none", "seed": seed,
                     "first_recalled": first_ok, "retained_above": kept, "retained_recalled": rec,
                     "second_steps": 10 * (seed + 1), "second_recalled": True, "rehearsal_share": 0.0})
    cells = retention_against_capacity(pd.DataFrame(rows), lambda r: 40.0 * r)
    (c,) = cells.to_dict("records")
    assert c["seeds"] == 2 and c["fill"] == pytest.approx(80 / 80)
    assert c["kept"] == pytest.approx(0.75) and (c["kept_lo"], c["kept_hi"]) == (0.5, 1.0)
    assert c["recalled"] == pytest.approx(0.5) and c["second_steps"] == pytest.approx(15)
    with pytest.raises(MemcoreError, match="no first passage was recalled"):
        retention_against_capacity(pd.DataFrame(rows[2:]), lambda r: 40.0 * r)
