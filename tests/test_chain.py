"""A run trained on top of another (`train --after RUN`): it starts from the earlier run's adapter, measures the
earlier targets at every step without training them, or rehearses them with --keep (under memft-ot only what fell
below τ), and records the chain."""

import csv
import json

import numpy as np
import pytest
import torch

from memcore import objectives as obj
from memcore.config import AdapterSpec, DataSpec, MemcoreError, ModelSpec, RunSpec, TrainSpec
from memcore.measure import greedy_generate
from memcore.runner import execute, prepare, stored_samples
from memcore.store import Store

FIRST = "The lighthouse keeper's cat is named Bartholomew."
SECOND = "Orbit: ninety two minutes at four hundred kilometres."


def _spec(model_dir, text, *, after=None, keep=False, method="sft", steps=40, rank=4, stop=True, kind="lora",
          lr=2e-2, prompt=None):
    return RunSpec(model=ModelSpec(name=str(model_dir)),
                   adapter=AdapterSpec(kind=kind, rank=rank, **({"layers": (1, 2)} if kind == "bypass" else {})),
                   data=DataSpec(text=text, **({"prompt": prompt} if prompt else {})),
                   train=TrainSpec(method=method, lr=lr, max_steps=steps, after=after, keep=keep,
                                   stop_when_recalled=stop, checkpoint_every=0))


def _train(store, spec, reports=None):
    base, samples = prepare(spec, home=store.home)
    return execute(spec, store, base, samples, on_report=None if reports is None else reports.append)


@pytest.fixture
def store(home):
    return Store(home)


def test_the_earlier_targets_start_where_the_parent_ended(store, tiny_model_dir):
    """Step 0 of the chained run measures the earlier targets exactly as the parent's last step left them (same
    adapter), and the chain is recorded in the summary and the store."""
    a = _train(store, _spec(tiny_model_dir, FIRST, steps=25))
    reports = []
    b = _train(store, _spec(tiny_model_dir, SECOND, after=a.run_id, steps=5), reports)
    last_a = store.step_rows(a.run_id)[-1]
    first = reports[0]
    assert first.step == 0 and first.earlier_p is not None
    np.testing.assert_allclose(first.earlier_p.astype(np.float32), last_a.p.astype(np.float32), atol=2e-3)
    assert first.earlier_correct.tolist() == last_a.correct.tolist()
    assert b.after == a.run_id and b.chain == [a.run_id] and b.earlier_tokens == a.n_tokens
    assert b.n_tokens == sum(len(s.target_ids) for s in stored_samples(store, b.run_id))  # its own tokens only
    rows = store.earlier_steps(b.run_id)
    assert [r.step for r in rows] == [r.step for r in store.steps(b.run_id)]  # measured at every step
    assert rows[0].earlier_above == first.earlier_above


def test_without_keep_no_gradient_reaches_the_earlier_targets(store, tiny_model_dir, monkeypatch):
    """Under sft (which weights every token it trains), the earlier rows get weight 0 at every step, and the
    adapter ends exactly where training the new text alone from the same start ends."""
    a = _train(store, _spec(tiny_model_dir, FIRST, steps=15))
    seen = []
    real = obj.token_weights

    def spy(spec, losses, window):
        w, active = real(spec, losses, window)
        seen.append((w.detach().clone(), losses.own_rows))
        return w, active

    monkeypatch.setattr(obj, "token_weights", spy)
    b = _train(store, _spec(tiny_model_dir, SECOND, after=a.run_id, steps=6, stop=False))
    assert len(seen) == 6 and all(own == 1 and w.shape[0] == 2 for w, own in seen)
    assert all(float(w[1:].abs().sum()) == 0.0 and float(w[0].sum()) > 0 for w, _ in seen)
    assert b.rehearsal_share == 0.0
    # the same training without the earlier rows, from the same adapter: the same adapter at the end
    from memcore.data import make_batch
    from memcore.loading import load_base
    from memcore.train import train

    base = load_base(ModelSpec(name=str(tiny_model_dir)))
    spec = _spec(tiny_model_dir, SECOND, steps=6, stop=False)
    with base.adapted(spec.adapter, seed=spec.train.seed) as model:
        init = model.stack.read(store.adapter_dir(a.run_id))
        batch = make_batch(stored_samples(store, b.run_id), base.tokenizer.pad_token_id)
        train(model, batch, spec.train, pad_id=base.tokenizer.pad_token_id, init_adapter=init)
        alone = model.stack.state(0)
    with base.adapted(spec.adapter, seed=spec.train.seed) as model:
        chained = model.stack.read(store.adapter_dir(b.run_id))
    for k in alone:
        torch.testing.assert_close(chained[k], alone[k], atol=1e-4, rtol=1e-3)


def test_keep_under_memft_ot_spends_weight_only_on_what_was_forgotten(store, tiny_model_dir, monkeypatch):
    """With --keep, memft-ot gives an earlier token weight only while it is below τ (one above τ carries 0), and
    the share of the weight spent rehearsing is recorded per step."""
    a = _train(store, _spec(tiny_model_dir, FIRST, steps=25))
    p = np.sort(store.step_rows(a.run_id)[-1].p.astype(np.float64))
    tau = float(p[len(p) // 2 - 1] + p[len(p) // 2]) / 2  # half the earlier tokens start above τ, half below
    assert p[len(p) // 2 - 1] < tau < p[len(p) // 2]
    seen = []
    real = obj.token_weights

    def spy(spec, losses, window):
        w, active = real(spec, losses, window)
        seen.append((w.detach().clone(), losses.loss.detach().clone(), losses.mask.clone()))
        return w, active

    monkeypatch.setattr(obj, "token_weights", spy)
    reports = []
    spec = _spec(tiny_model_dir, SECOND, after=a.run_id, keep=True, method="memft-ot", steps=8, stop=False)
    spec = RunSpec(model=spec.model, adapter=spec.adapter, data=spec.data,
                   train=TrainSpec(**{**spec.train.__dict__, "tau": tau}))
    b = _train(store, spec, reports)
    cut = obj.cut(tau)
    above_seen = below_seen = 0
    for w, loss, mask in seen:
        earlier = mask[1:]
        assert earlier.any()  # rehearsed: the earlier rows are trained
        above = earlier & (loss[1:] < cut)
        below = earlier & (loss[1:] > cut)
        assert float(w[1:][above].abs().sum()) == 0.0
        assert bool((w[1:][below] > 0).all())
        above_seen += int(above.sum())
        below_seen += int(below.sum())
    assert above_seen > 0 and below_seen > 0  # both kinds of earlier token met
    shares = [r.rehearsal for r in reports if not r.final]
    assert all(s is not None and 0 <= s <= 1 for s in shares) and max(shares) > 0
    assert b.keep and b.rehearsal_share == pytest.approx(np.mean([s for r, s in zip(reports, shares)
                                                                  if not r.skipped]), rel=1e-6)


def test_a_chain_exports_an_adapter_that_recites_both_passages(store, tmp_path):
    """On the default model's bypass (rank 2): A, then B with --keep (its own prompt) until both are recalled; the
    exported adapter recites both passages verbatim, and its card names the chain. A prompt shared with the
    earlier run is said to make that impossible."""
    from memcore.export import export_run

    def spec(text, prompt, **train):
        return RunSpec(adapter=AdapterSpec(kind="bypass", rank=2, layers="paper"),
                       data=DataSpec(text=text, prompt=prompt),
                       train=TrainSpec(**{"method": "sft", "lr": 3e-2, "max_steps": 150, "checkpoint_every": 0,
                                          **train}))

    a = _train(store, spec("The lighthouse keeper's cat is named Bartholomew and sleeps on the lamp.", "Cat:"))
    assert a.recalled
    b = _train(store, spec("Orbital mechanics: a satellite at 400 km circles Earth every ninety two minutes.",
                           "Orbit:", after=a.run_id, keep=True))
    assert b.recalled and b.earlier_recalled and b.stop_reason == "recalled", (b.stop_reason, b.earlier_prefix)
    assert 0 < b.rehearsal_share < 1
    assert not any("same as an earlier run's" in n for n in b.notes)
    dest = export_run(store, b.run_id, tmp_path / "chain")
    card = (dest / "README.md").read_text()
    assert f"run {a.run_id} → this run" in card and "rehearsed the earlier targets" in card
    # the folder alone says what to recite: its own passage and, under `earlier`, A's
    memo = json.loads((dest / "memcore.json").read_text())
    assert [e["run"] for e in memo["earlier"]] == [a.run_id]
    both = stored_samples(store, a.run_id) + stored_samples(store, b.run_id)
    assert memo["earlier"][0]["target_ids"] + memo["target_ids"] == [s.target_ids for s in both]
    assert memo["earlier"][0]["prompt_ids"] + memo["prompt_ids"] == [s.prompt_ids for s in both]
    with open(dest / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["step"] == str(b.steps) and rows[-1]["earlier_above"] == str(b.earlier_above)
    assert rows[-1]["earlier_tokens"] == str(b.earlier_tokens) and float(rows[1]["rehearsal"]) > 0
    base, _ = prepare(spec("x", "Cat:"), home=store.home)
    with base.adapted(dest) as model:
        gen = greedy_generate(model, both, base.tokenizer.pad_token_id)
    assert gen == [s.target_ids for s in both]
    same = _train(store, spec("Rain on the roof.", "Cat:", after=a.run_id, max_steps=1))
    assert any("same as an earlier run's" in n for n in same.notes)


def test_a_chain_must_keep_the_model_and_placement(store, tiny_model_dir, tmp_path):
    """--after refuses another rank, adapter kind or model (each named with both values), an unknown or still
    running run, and --keep without --after."""
    a = _train(store, _spec(tiny_model_dir, FIRST, steps=2))
    with pytest.raises(MemcoreError, match=rf"rank 2 \(run {a.run_id}: 4\)"):
        _train(store, _spec(tiny_model_dir, SECOND, after=a.run_id, rank=2))
    with pytest.raises(MemcoreError, match=rf"adapter bypass \(run {a.run_id}: lora\)"):
        _train(store, _spec(tiny_model_dir, SECOND, after=a.run_id, kind="bypass"))
    with pytest.raises(MemcoreError, match="no run 'nope'"):
        _train(store, _spec(tiny_model_dir, SECOND, after="nope"))
    with pytest.raises(MemcoreError, match="--keep rehearses .* give --after RUN"):
        TrainSpec(keep=True)
    rid = store.create_run(_spec(tiny_model_dir, SECOND).to_dict())
    store.set_status(rid, "running")
    with pytest.raises(MemcoreError, match="still running"):
        _train(store, _spec(tiny_model_dir, SECOND, after=rid))
    assert [r["id"] for r in store.runs(status="completed")] == [a.run_id]  # nothing saved was lost or added


def test_chained_runs_train_in_a_batch_and_resume_as_alone(store, tiny_model_dir):
    """The batched trainer gives a chained run (with and without --keep) the numbers it gets alone, beside a plain
    run; and a chained run stopped at a checkpoint resumes to the same end."""
    from memcore.runner import BatchedRun, drain, execute_iter, execute_many, resume_iter

    a = _train(store, _spec(tiny_model_dir, FIRST, steps=20))
    specs = [_spec(tiny_model_dir, SECOND, after=a.run_id, steps=5, stop=False),
             _spec(tiny_model_dir, SECOND, after=a.run_id, keep=True, method="memft-ot", steps=5, stop=False),
             _spec(tiny_model_dir, "Rain on the roof.", steps=5, stop=False)]
    solo = []
    for spec in specs:
        reports = []
        _train(store, spec, reports)
        solo.append(reports)
    base, _ = prepare(specs[0], home=store.home)
    runs = []
    for i, spec in enumerate(specs):
        _, samples = prepare(spec, base, store.home)
        runs.append(BatchedRun(spec, samples, tag=i))
    got: dict[int, list] = {0: [], 1: [], 2: []}
    for tag, r in execute_many(runs, store, base, slots=3, max_rank=4):
        got[tag].append(r)
    for i in range(3):
        assert [r.step for r in got[i]] == [r.step for r in solo[i]]
        for x, y in zip(got[i], solo[i]):
            np.testing.assert_allclose(x.p.astype(np.float32), y.p.astype(np.float32), atol=3e-3)
            if i < 2:
                np.testing.assert_allclose(x.earlier_p.astype(np.float32), y.earlier_p.astype(np.float32), atol=3e-3)
                assert x.rehearsal == pytest.approx(y.rehearsal, abs=1e-3)
    # stopped after 3 of 6 steps (a checkpoint), then resumed: the same end as a run never stopped
    spec = _spec(tiny_model_dir, SECOND, after=a.run_id, keep=True, steps=6, stop=False)
    whole = _train(store, spec)
    calls = iter(range(100))
    base, samples = prepare(spec, home=store.home)
    cut = drain(execute_iter(spec, store, base, samples, should_stop=lambda: next(calls) >= 3))
    assert cut.stop_reason == "stopped"
    child = _train(store, _spec(tiny_model_dir, "Rain on the roof.", after=cut.run_id, steps=1, prompt="Rain:"))
    assert any(f"run {cut.run_id} did not finish (status stopped)" in n for n in child.notes)
    _, gen = resume_iter(store, cut.run_id, base)
    resumed = drain(gen)
    assert resumed.steps == whole.steps and resumed.earlier_tokens == whole.earlier_tokens
    assert resumed.earlier_above == whole.earlier_above and resumed.n_above == whole.n_above
    assert resumed.loss == pytest.approx(whole.loss, abs=1e-3)
    assert [r.step for r in store.earlier_steps(cut.run_id)] == list(range(7))


def test_the_cli_takes_the_placement_from_the_earlier_run_and_refuses_a_typed_other(home, tiny_model_dir, capsys):
    """`train --after` takes model and placement from the earlier run for every flag not typed; a typed one that
    differs is refused before the model loads, even when it is the flag's default value (--adapter lora, --rank 8)."""
    import json

    from memcore.cli import main

    common = ["--model", str(tiny_model_dir), "--max-steps", "1", "--json"]
    assert main(["train", "--text", "First.", "--prompt", "A:", "--adapter", "bypass", "--layers", "1", "--rank", "2",
                 *common]) == 0
    a = json.loads(capsys.readouterr().out)
    for typed, words in ((["--adapter", "lora"], "adapter lora"), (["--rank", "8"], "rank 8")):
        assert main(["train", "--after", "last", "--text", "Second.", "--prompt", "B:", *typed, *common]) == 2
        err = capsys.readouterr().err
        assert f"{words} (run {a['run_id']}: " in err and "loading" not in err, err
    assert main(["train", "--after", "last", "--text", "Second.", "--prompt", "B:", *common[2:]]) == 0
    b = json.loads(capsys.readouterr().out)
    spec = Store(home).run(b["run_id"])["spec"]
    assert spec["adapter"]["kind"] == "bypass" and spec["adapter"]["rank"] == 2 and spec["adapter"]["layers"] == [1]
    assert spec["model"]["name"] == str(tiny_model_dir) and b["after"] == a["run_id"]
    assert main(["train", "--after", "last", "--keep", "--text", "Third.", "--prompt", "C:", *common[2:]]) == 0
    c = json.loads(capsys.readouterr().out)
    assert main(["runs"]) == 0  # the table names each run's parent, and which rehearsed it
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines[b["run_id"]].rstrip().endswith(a["run_id"]) and lines[a["run_id"]].rstrip().endswith("-")
    assert lines[c["run_id"]].rstrip().endswith(f"{b['run_id']} +keep")
    assert main(["runs", "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (listed[c["run_id"]]["after"], listed[c["run_id"]]["keep"]) == (b["run_id"], True)
    assert (listed[b["run_id"]]["after"], listed[b["run_id"]]["keep"]) == (a["run_id"], False)
    assert main(["show", c["run_id"]]) == 0  # on top of two passages: each earlier one said on its own line
    shown = capsys.readouterr().out
    assert f"  run {a['run_id']}  " in shown and f"  run {b['run_id']}  " in shown


def test_a_chain_of_three_is_told_as_one_story(store, tiny_model_dir, tmp_path):
    """chain_story: A → B → C on one step axis, every passage measured over the runs after its own (split per passage
    when C measures A and B together, matching what B measured of A at its end), each run's start, and a 'lost'
    event wherever a passage recalled verbatim stopped being recalled while a later run trained."""
    from memcore.chain import chain_of, chain_story

    a = _train(store, _spec(tiny_model_dir, FIRST, steps=30, prompt="One:"))
    b = _train(store, _spec(tiny_model_dir, SECOND, after=a.run_id, steps=30, prompt="Two:"))
    c = _train(store, _spec(tiny_model_dir, "Third words here.", after=b.run_id, steps=4, prompt="Three:"))
    assert chain_of(store, c.run_id) == [a.run_id, b.run_id] and chain_of(store, a.run_id) == []
    story = chain_story(store, c.run_id)
    assert story.runs == [a.run_id, b.run_id, c.run_id]
    assert story.starts == [(0, a.run_id), (a.steps, b.run_id), (a.steps + b.steps, c.run_id)]
    rows = {(r["run"], r["passage"], r["story_step"]): r for r in story.rows}
    end_b = a.steps + b.steps
    # A at B's last step (measured by B) is A at C's step 0 (measured by C, split from A and B together)
    by_b, by_c = rows[(b.run_id, a.run_id, end_b)], rows[(c.run_id, a.run_id, end_b)]
    assert (by_b["above"], by_b["recalled"], by_b["tokens"]) == (by_c["above"], by_c["recalled"], a.n_tokens)
    assert rows[(c.run_id, b.run_id, end_b)]["above"] == store.steps(b.run_id)[-1].n_above
    assert {r["passage"] for r in story.rows if r["run"] == c.run_id} == {a.run_id, b.run_id, c.run_id}
    for step, passage, kind in story.events:  # each event where its passage's recall changed, in a later run
        series = sorted((r["story_step"], r["recalled"]) for r in story.rows
                        if r["passage"] == passage and r["run"] != passage)
        before = [rec for st, rec in series if st < step]
        at = [rec for st, rec in series if st == step]
        assert before and before[-1] is (kind == "lost") and at[-1] is (kind == "regained")
    assert a.recalled and b.earlier_lost_at is not None  # A was recalled, and B's training knocked it out
    assert (a.steps + b.earlier_lost_at, a.run_id, "lost") in story.events
    # C's summary gives A and B apart, each as C's last step measured it, adding up to the combined figures
    parts = {x["run"]: x for x in c.earlier_parts}
    assert list(parts) == [a.run_id, b.run_id]
    assert (parts[a.run_id]["tokens"], parts[b.run_id]["tokens"]) == (a.n_tokens, b.n_tokens)
    assert sum(x["above"] for x in parts.values()) == c.earlier_above
    assert sum(x["correct"] for x in parts.values()) == c.earlier_correct
    assert c.earlier_recalled == all(x["recalled"] for x in parts.values())
    assert parts[a.run_id]["prefix"] == min(c.earlier_prefix, a.n_tokens)
    assert store.run(c.run_id)["summary"].earlier_parts == c.earlier_parts  # stored with the summary
    from memcore.export import export_run

    card = (export_run(store, c.run_id, tmp_path / "c") / "README.md").read_text()
    for x in c.earlier_parts:  # and in the card
        state = "recalled" if x["recalled"] else "not recalled"
        assert f"run {x['run']}: {state}, {x['above']} / {x['tokens']}" in card
