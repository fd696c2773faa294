"""Many runs, one batch: every run of train_many gets exactly the numbers it gets alone (train_iter), step by step,
whatever the others do (other ranks, lengths, methods, sample counts; one ending early while the others go on),
for LoRA and the bypass; and an older checkpoint still resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memcore.config import AdapterSpec, DataSpec, TrainSpec
from memcore.data import build_samples, make_batch
from memcore.stack import AdapterStack
from memcore.train import RunInput, train_iter, train_many

TEXTS = ["Seven pale moths circled the lamp until the kettle sang.",
         "The keeper drew the boat in the margin and coloured the piano blue, then closed the ledger for the night.",
         "Rain."]


def _batch(base, data: DataSpec):
    tok = base.tokenizer
    return make_batch(build_samples(tok, data), tok.pad_token_id)


def _runs(kind: str):
    """(adapter, train spec, data) of three runs unlike each other in every way a batch must keep apart."""
    layers = "paper" if kind == "bypass" else (1, 2)
    common = dict(stop_when_recalled=False, verify=False, checkpoint_every=0)
    return [
        (AdapterSpec(kind=kind, rank=1, layers=layers), TrainSpec(method="sft", lr=5e-2, max_steps=6, seed=0, **common),
         DataSpec(text=TEXTS[0])),
        # ends after 3 steps while the others go on; τ tiny: some tokens above it, so memft-ot's weights move
        (AdapterSpec(kind=kind, rank=4, layers=layers), TrainSpec(method="memft-ot", tau=2e-5, lr=3e-2, max_steps=3,
                                                                  seed=1, weight_decay=0.1, **common),
         DataSpec(text=TEXTS[1])),
        # two samples (a curriculum), the sliding window
        (AdapterSpec(kind=kind, rank=2, layers=layers), TrainSpec(method="memft-sw", lr=5e-2, max_steps=6, seed=2,
                                                                  curriculum_stages=2, **common),
         DataSpec(pairs=(("Q:", " " + TEXTS[2]), ("R:", " " + TEXTS[0])), seed=2)),
    ]


def _solo(tiny_base, adapter, spec, data):
    with tiny_base.adapted(adapter, seed=spec.seed) as m:
        reports = list(train_iter(m, _batch(tiny_base, data), spec, pad_id=tiny_base.tokenizer.pad_token_id))
        return reports, m.stack.state(0)


@pytest.mark.parametrize("kind", ["lora", "bypass"])
def test_each_batched_run_matches_its_solo_run(tiny_base, kind):
    runs = _runs(kind)
    solo = [_solo(tiny_base, a, t, d) for a, t, d in runs]
    stack = AdapterStack(tiny_base.model, runs[0][0], slots=3, max_rank=4)
    try:
        inputs = [RunInput(batch=_batch(tiny_base, d), spec=t, adapter=a, tag=i) for i, (a, t, d) in enumerate(runs)]
        got: dict[int, list] = {0: [], 1: [], 2: []}
        order = []
        for tag, report in train_many(tiny_base.model, stack, inputs, pad_id=tiny_base.tokenizer.pad_token_id):
            got[tag].append(report)
            order.append((tag, report.step, report.final))
    finally:
        stack.detach()
    assert (1, 3, True) in order and order.index((1, 3, True)) < order.index((0, 6, True))  # it left early
    for i, (reports, state) in enumerate(solo):
        batched = got[i]
        assert [r.step for r in batched] == [r.step for r in reports] and batched[-1].final
        for a, b in zip(batched, reports):
            assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-6), (i, a.step)
            assert a.delta_loss == pytest.approx(b.delta_loss, rel=1e-4, abs=1e-5)
            np.testing.assert_allclose(a.p.astype(np.float32), b.p.astype(np.float32), rtol=2e-3, atol=1e-6)
            assert a.active == b.active and a.skipped == b.skipped
        for name, value in state.items():  # the final adapter, from the batch's final report
            torch.testing.assert_close(batched[-1].adapter[name], value, rtol=1e-3, atol=1e-5)


def test_more_runs_than_slots_take_each_freed_slot_in_turn(tiny_base):
    """Five runs through two slots: each still matches itself alone, and never more than two train at once."""
    specs = [(AdapterSpec(kind="bypass", rank=r, layers="paper"),
              TrainSpec(method="sft", lr=5e-2, max_steps=m, seed=s, stop_when_recalled=False, verify=False,
                        checkpoint_every=0),
              DataSpec(text=TEXTS[s % 3])) for s, (r, m) in enumerate([(1, 2), (2, 4), (1, 3), (2, 2), (1, 1)])]
    stack = AdapterStack(tiny_base.model, specs[0][0], slots=2, max_rank=2)
    live, most = set(), 0
    finals = {}
    try:
        inputs = [RunInput(batch=_batch(tiny_base, d), spec=t, adapter=a, tag=i) for i, (a, t, d) in enumerate(specs)]
        for tag, r in train_many(tiny_base.model, stack, inputs, pad_id=tiny_base.tokenizer.pad_token_id):
            live.add(tag)
            most = max(most, len(live))
            if r.final:
                live.discard(tag)
                finals[tag] = r
    finally:
        stack.detach()
    assert most <= 2 and sorted(finals) == [0, 1, 2, 3, 4]
    for i, (a, t, d) in enumerate(specs):
        reports, _ = _solo(tiny_base, a, t, d)
        assert finals[i].step == t.max_steps and finals[i].loss == pytest.approx(reports[-1].loss, rel=1e-5)


def test_a_checkpoint_from_before_the_stack_resumes(tiny_base):
    """A checkpoint saved by earlier versions (PEFT parameter names, torch.optim.AdamW's state dict) continues to
    the numbers a checkpoint of today's format gives."""
    from peft import LoraConfig, get_peft_model

    from memcore.targets import target_module_regex
    from memcore.train import Checkpoint

    adapter = AdapterSpec(rank=2, layers=(1, 2))
    spec = TrainSpec(method="sft", lr=5e-2, max_steps=5, stop_when_recalled=False, verify=False, checkpoint_every=0)
    b = _batch(tiny_base, DataSpec(text=TEXTS[1]))
    saved = []
    with tiny_base.adapted(adapter, seed=0) as m:  # a checkpoint at the top of every step, in today's format
        list(train_iter(m, b, TrainSpec(**{**spec.__dict__, "checkpoint_every": 1e-9}), checkpoint=saved.append))
    today = next(c for c in saved if c.step == 3)
    # the same state as an older version wrote it: PEFT's names and shapes, torch AdamW's state dict
    regex, _, _ = target_module_regex(tiny_base.model, adapter)
    peft = get_peft_model(tiny_base.model, LoraConfig(r=2, lora_alpha=2, target_modules=regex, task_type="CAUSAL_LM"))
    try:
        names = [n for n, p in peft.named_parameters() if p.requires_grad]
        old_adapter, old_state = {}, {}
        for i, n in enumerate(names):
            module = n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            key = f"{module}.A" if ".lora_A." in n else f"{module}.B"
            old_adapter[n] = today.adapter[key].T.contiguous()
            old_state[i] = {"step": torch.tensor(float(today.optimizer["step"])),
                            "exp_avg": today.optimizer["exp_avg"][key].T.contiguous(),
                            "exp_avg_sq": today.optimizer["exp_avg_sq"][key].T.contiguous()}
    finally:
        peft.unload()
    old = Checkpoint(**{**today.__dict__, "adapter": old_adapter,
                        "optimizer": {"state": old_state, "param_groups": [{"params": list(range(len(names)))}]},
                        "rng": torch.get_rng_state()})
    with tiny_base.adapted(adapter, seed=9) as m:
        from_today = list(train_iter(m, b, spec, resume=today))
    with tiny_base.adapted(adapter, seed=9) as m:
        from_old = list(train_iter(m, b, spec, resume=old))
    assert [r.step for r in from_old] == [3, 4, 5]
    assert [r.loss for r in from_old] == pytest.approx([r.loss for r in from_today], rel=1e-6)


@pytest.mark.parametrize("kind", ["lora", "bypass"])
def test_minibatch_runs_in_a_batch_match_their_solo_runs(tiny_base, kind):
    """PhoneBooks trained in minibatches (one with memft-sw's temporal curriculum) beside a plain passage: every run
    gets its own batches and the numbers it gets alone, though the loop's batch is cut anew every step."""
    layers = "paper" if kind == "bypass" else (1, 2)
    common = dict(stop_when_recalled=False, verify=False, checkpoint_every=0)
    runs = [
        (AdapterSpec(kind=kind, rank=2, layers=layers), TrainSpec(method="sft", lr=5e-2, max_steps=7, seed=0,
                                                                  batch_size=2, **common),
         DataSpec(phonebook=5, seed=1)),
        (AdapterSpec(kind=kind, rank=1, layers=layers), TrainSpec(method="memft-sw", lr=5e-2, max_steps=8, seed=1,
                                                                  batch_size=2, curriculum_stages=2,
                                                                  curriculum_epochs=(2,), **common),
         DataSpec(phonebook=6, seed=2)),
        (AdapterSpec(kind=kind, rank=4, layers=layers), TrainSpec(method="sft", lr=5e-2, max_steps=5, seed=2, **common),
         DataSpec(text=TEXTS[1])),
    ]
    solo = [_solo(tiny_base, a, t, d) for a, t, d in runs]
    stack = AdapterStack(tiny_base.model, runs[0][0], slots=3, max_rank=4)
    try:
        inputs = [RunInput(batch=_batch(tiny_base, d), spec=t, adapter=a, tag=i) for i, (a, t, d) in enumerate(runs)]
        got: dict[int, list] = {0: [], 1: [], 2: []}
        for tag, report in train_many(tiny_base.model, stack, inputs, pad_id=tiny_base.tokenizer.pad_token_id):
            got[tag].append(report)
    finally:
        stack.detach()
    for i, (reports, state) in enumerate(solo):
        batched = got[i]
        assert [r.batch_rows for r in batched] == [r.batch_rows for r in reports]
        for a, b in zip(batched, reports):
            np.testing.assert_allclose(a.p.astype(np.float32), b.p.astype(np.float32), rtol=2e-3, atol=1e-5)
            assert a.active == b.active
        for name, value in state.items():
            torch.testing.assert_close(batched[-1].adapter[name], value, rtol=1e-3, atol=1e-5)
    assert got[1][0].batch_rows is not None and max(max(r.batch_rows) for r in got[1][:4]) <= 2  # stage 1: 3 of 6
