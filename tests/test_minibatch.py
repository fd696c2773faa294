"""Minibatches of many samples (the paper's PhoneBook): epochs, reshuffling, memft-sw's temporal curriculum, and a
training loop whose reports still cover every sample."""


import numpy as np
import pytest
import torch

from memcore.config import DataSpec, MemcoreError, TrainSpec
from memcore.data import build_samples, make_batch
from memcore.measure import token_losses
from memcore.objectives import minibatch, schedule_notes
from memcore.train import train_iter


def _book(base, n=6):
    tok = base.tokenizer
    return make_batch(build_samples(tok, DataSpec(phonebook=n, seed=2)), tok.pad_token_id)


# --- the schedule ------------------------------------------------------------------------------------------


def test_each_epoch_trains_every_sample_once_in_a_new_order():
    spec = TrainSpec(method="sft", batch_size=4, seed=3)
    n = 10  # 3 steps an epoch: 4 + 4 + 2
    epochs: dict[int, list[int]] = {}
    for step in range(12):
        mb = minibatch(step, n, spec)
        assert mb.stage == 1 and mb.n_active == n and mb.epoch == step // 3
        assert len(mb.rows) == (2 if step % 3 == 2 else 4)
        epochs.setdefault(mb.epoch, []).extend(mb.rows.tolist())
    orders = [tuple(rows) for rows in epochs.values()]
    assert all(sorted(o) == list(range(n)) for o in orders)  # every sample exactly once per epoch
    assert len(set(orders)) == len(orders)  # reshuffled every epoch
    again = [minibatch(s, n, spec).rows.tolist() for s in range(12)]
    assert again == [minibatch(s, n, TrainSpec(method="sft", batch_size=4, seed=3)).rows.tolist() for s in range(12)]
    other = [minibatch(s, n, TrainSpec(method="sft", batch_size=4, seed=4)).rows.tolist() for s in range(12)]
    assert other != again  # the seed draws the order


def test_memft_sw_on_many_samples_is_the_papers_temporal_curriculum():
    # 10 samples, 5 stages ending at epochs 2, 4, 6, 8: stage s trains the first 2s samples, 2 a batch
    spec = TrainSpec(method="memft-sw", batch_size=2, curriculum_stages=5, curriculum_epochs=(2, 4, 6, 8),
                     max_steps=100)
    seen = {}
    for step in range(40):
        mb = minibatch(step, 10, spec)
        assert set(mb.rows) <= set(range(mb.n_active)) and mb.n_active == 2 * mb.stage
        seen.setdefault(mb.epoch, (mb.stage, set()))[1].update(mb.rows.tolist())
    # epochs 0-1 stage 1 (samples 0-1), 2-3 stage 2 (0-3), ..., 8 on the last stage (all ten)
    assert {e: st for e, (st, _) in seen.items() if e < 10} == {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 4,
                                                                 8: 5, 9: 5}
    assert all(rows == set(range(2 * st)) for e, (st, rows) in seen.items() if e < 10)
    # steps per stage: 1, 2, 3, 4 per epoch for 2 epochs each -> the last stage starts at step 2 * (1+2+3+4) = 20
    assert minibatch(19, 10, spec).stage == 4 and minibatch(20, 10, spec).stage == 5
    # without epochs the stages share the step budget (rounded to whole epochs); other methods have no stages
    plain = TrainSpec(method="memft-sw", batch_size=2, curriculum_stages=5, max_steps=50)
    assert [minibatch(s, 10, plain).stage for s in (0, 9, 10, 49)] == [1, 1, 2, 5]
    assert minibatch(0, 10, TrainSpec(method="sft", batch_size=2)).n_active == 10


def test_settings_that_would_do_nothing_are_said():
    """A curriculum given to another method, or without minibatches, and a budget that ends before the last stage
    (its samples never train) each get a note; the paper's schedule with room to run gets none."""
    paper = dict(batch_size=2, curriculum_epochs=(2, 4, 6, 8))
    assert schedule_notes(TrainSpec(method="memft-sw", max_steps=100, **paper), 10) == []
    assert schedule_notes(TrainSpec(method="sft", batch_size=2), 10) == []
    [n] = schedule_notes(TrainSpec(method="sft", max_steps=100, **paper), 10)
    assert "only shape memft-sw" in n and "sft run trains every sample" in n
    [n] = schedule_notes(TrainSpec(method="memft-sw", curriculum_stages=3), 10)
    assert "minibatches (--batch-size)" in n
    # stage 3 of 5 starts at step 2 * (1 + 2) = 6: a 5-step budget ends in stage 2, training 4 of the 10 samples
    [n] = schedule_notes(TrainSpec(method="memft-sw", max_steps=5, **paper), 10)
    assert "ends in curriculum stage 2 of 5" in n and "first 4 of 10 samples" in n and "at step 6" in n


def test_minibatch_settings_are_checked():
    with pytest.raises(MemcoreError, match="batch size"):
        TrainSpec(batch_size=0)
    with pytest.raises(MemcoreError,
                       match=r"5 stages need 4 numbers, got 2 \(20,40\); give 4, or set --curriculum-stages 3"):
        TrainSpec(method="memft-sw", batch_size=2, curriculum_epochs=(20, 40))
    with pytest.raises(MemcoreError, match="increasing whole numbers >= 1, like 20,40,60,80; got 20,10,60,80"):
        TrainSpec(method="memft-sw", batch_size=2, curriculum_epochs=(20, 10, 60, 80))
    with pytest.raises(MemcoreError, match="give --batch-size N as well"):
        TrainSpec(method="memft-sw", curriculum_epochs=(2, 4, 6, 8))


# --- the loop ----------------------------------------------------------------------------------------------


def test_a_minibatch_run_reports_every_sample_and_refreshes_those_it_trains(bypassed, tiny_base):
    b = _book(tiny_base, 6)
    spans = np.cumsum([0] + [len(s.target_ids) for s in b.samples])
    spec = TrainSpec(method="sft", lr=5e-2, batch_size=2, max_steps=9, stop_when_recalled=False, verify=False)
    reports = list(train_iter(bypassed(), b, spec))
    n = int(spans[-1])
    assert all(len(r.p) == n for r in reports)  # metrics over all samples, every step
    for prev, cur in zip(reports, reports[1:-1]):
        assert len(cur.batch_rows) == 2 and cur.epoch == cur.step // 3
        for i in set(range(6)) - set(cur.batch_rows):  # a sample this step did not touch keeps its last value
            assert np.array_equal(cur.p[spans[i]:spans[i + 1]], prev.p[spans[i]:spans[i + 1]])
        for i in cur.batch_rows:  # one it trained was measured again, after the last update
            assert not np.array_equal(cur.p[spans[i]:spans[i + 1]], prev.p[spans[i]:spans[i + 1]])
    epoch0 = sorted(i for r in reports[:3] for i in r.batch_rows)
    assert epoch0 == list(range(6))
    # the final report measures every sample with the final adapter
    final = reports[-1]
    m = tiny_base.model
    with torch.no_grad():
        loss, _ = token_losses(m, b)
    fresh = np.exp(-loss[b.target_mask].numpy())
    assert np.allclose(final.p.astype(np.float32), fresh, atol=2e-3)


def test_one_minibatch_of_the_whole_book_is_full_batch_training(bypassed, tiny_base):
    b = _book(tiny_base, 5)
    base = dict(method="memft-ot", lr=5e-2, max_steps=6, stop_when_recalled=False, verify=False)
    whole = list(train_iter(bypassed(seed=1), b, TrainSpec(**base)))
    mini = list(train_iter(bypassed(seed=1), b, TrainSpec(**base, batch_size=5)))
    assert [r.batch_rows for r in mini[:-1]] == [[0, 1, 2, 3, 4]] * 6
    for a, c in zip(whole, mini):
        assert a.step == c.step and a.active == c.active
        assert np.allclose(a.p.astype(np.float32), c.p.astype(np.float32), atol=1e-3)


def test_a_stopped_minibatch_run_resumes_on_the_same_batches(bypassed, tiny_base):
    b = _book(tiny_base, 6)
    spec = TrainSpec(method="sft", lr=5e-2, batch_size=2, max_steps=10, stop_when_recalled=False, verify=False)
    whole = list(train_iter(bypassed(seed=2), b, spec))
    saved, calls = [], iter(range(1000))
    first = list(train_iter(bypassed(seed=2), b, spec, should_stop=lambda: next(calls) >= 4, checkpoint=saved.append))
    assert first[-1].stop_reason == "stopped"
    rest = list(train_iter(bypassed(seed=5), b, spec, resume=saved[-1]))
    assert [r.batch_rows for r in rest[:-1]] == [r.batch_rows for r in whole[4:-1]]
    assert np.allclose(rest[-1].p.astype(np.float32), whole[-1].p.astype(np.float32), atol=1e-3)


def test_measuring_many_samples_in_row_chunks_gives_the_same_numbers(bypassed, tiny_base, monkeypatch):
    """A big book's measuring forwards (the base loss with the frozen prefix, the start of a run whose base loss was
    given, the final measure) run a few rows at a time: the same numbers as all rows at once."""
    import memcore.measure as measure
    import memcore.train as train

    b = _book(tiny_base, 7)
    spec = TrainSpec(method="memft-ot", lr=5e-2, batch_size=3, max_steps=5, stop_when_recalled=False, verify=False)
    with torch.no_grad():
        base_loss, _ = token_losses(tiny_base.model, b)
    whole = list(train_iter(bypassed(seed=3), b, spec, base_loss=base_loss))
    rows = b.input_ids.shape[1] * 2  # two rows a chunk: 4 chunks of the 7
    monkeypatch.setattr(measure, "NO_GRAD_TOKENS", rows)
    monkeypatch.setattr(train, "NO_GRAD_TOKENS", rows)
    chunked = list(train_iter(bypassed(seed=3), b, spec, base_loss=base_loss))
    fresh = list(train_iter(bypassed(seed=3), b, spec))  # base loss measured by the loop, in chunks
    for a, c, d in zip(whole, chunked, fresh):
        np.testing.assert_allclose(a.p.astype(np.float32), c.p.astype(np.float32), atol=1e-3)
        np.testing.assert_allclose(a.p.astype(np.float32), d.p.astype(np.float32), atol=1e-3)
        assert a.batch_rows == c.batch_rows
