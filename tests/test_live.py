"""The live view's record of a run stays bounded however long the run, and loses nothing it shows."""

from __future__ import annotations

import numpy as np
import pytest
from jobs import MAX_KEPT, RunLive

from memcore.config import RunSpec, TrainSpec
from memcore.metrics import StubbornCounter, stubborn_tokens
from memcore.records import StepRow


def _report(step, p, final=False):
    n = len(p)
    return StepRow(step=step, loss=1.0 / (step + 1), delta_loss=0.1 * step, n_above=int((p > 0.5).sum()), n_correct=n,
                   n_tokens=n, active=n, recalled=False, first_divergence=None, elapsed=0.5 * step, lr=1e-3,
                   skipped=False, p=p, correct=np.ones(n, bool), final=final)


def _history(steps, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((steps, n)).astype(np.float16)


@pytest.mark.parametrize("steps", [10, MAX_KEPT + 1, 5 * MAX_KEPT + 37])
def test_a_long_run_keeps_a_bounded_evenly_spaced_history_and_exact_stubborn_counts(steps):
    hist = _history(steps, 50)
    live = RunLive(label="sft", spec=RunSpec(train=TrainSpec(tau=0.5)))
    for s in range(steps):
        live.record(_report(s, hist[s]))
    assert len(live.steps) <= MAX_KEPT + 1 and live.steps[-1] == steps - 1
    assert live.steps == sorted(set(live.steps))
    body = live.steps[:-1]
    assert all(s % live.stride == 0 for s in body) and len(body) >= min(steps - 1, MAX_KEPT // 2)
    assert np.array_equal(live.p_history, hist[live.steps])  # every kept row is that step's p
    assert [r["step"] for r in live.rows] == live.steps
    assert np.array_equal(live.p, hist[-1]) and (steps == 1 or np.array_equal(live.p_prev, hist[-2]))
    assert live.stubborn.top(6) == stubborn_tokens(hist, 0.5, k=6)  # counted over every step, not the kept ones


def test_the_final_report_replaces_the_latest_step():
    hist = _history(3, 8)
    live = RunLive(label="sft", spec=RunSpec())
    for s in range(3):
        live.record(_report(s, hist[s]))
    remeasured = np.full(8, 0.9, np.float16)
    summary = object()  # the final step brings the run's summary along
    live.record(_report(2, remeasured, final=True), summary)
    assert live.steps == [0, 1, 2] and np.array_equal(live.p, remeasured) and live.summary is summary
    assert live.stubborn.count == 3


def test_stubborn_counter_ranks_by_time_below_then_latest_to_cross():
    c = StubbornCounter(4, tau=0.5)
    for row in ([0.1, 0.1, 0.9, 0.2], [0.6, 0.1, 0.9, 0.3], [0.6, 0.7, 0.9, 0.6]):
        c.update(np.array(row))
    top = c.top()
    # tokens 1 and 3 tie on time below and last step below: the lower p now (token 3) first;
    # token 2, never below τ, is not stubborn
    assert [t["index"] for t in top] == [3, 1, 0]
    assert top[0] == {"index": 3, "steps_below": 2, "last_below": 1, "p": pytest.approx(0.6)}
    assert top[1]["steps_below"] == 2 and top[2]["steps_below"] == 1


def test_stubborn_ties_go_to_the_lowest_p_now():
    """Early in a run many tokens have been below τ equally long: the ones furthest from τ are the stubborn ones."""
    c = StubbornCounter(3, tau=0.5)
    c.update(np.array([0.01, 0.45, 0.2]))
    assert [t["index"] for t in c.top()] == [0, 2, 1]
