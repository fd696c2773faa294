"""Read-outs computed from a run's token history: stubborn tokens, capacity figures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class StubbornCounter:
    """Running per-token record of how long each token stayed at or below tau, fed one step at a time.

    update() costs O(N) per step whatever the run's length, so a live view (or a run's summary) never has to
    rescan the whole [S, N] history. Steps are counted from 0 in the order they are fed."""

    def __init__(self, n_tokens: int, tau: float):
        self.tau = float(tau)
        self.steps_below = np.zeros(n_tokens, dtype=np.int64)  # [N] recorded steps at or below tau
        self.last_below = np.full(n_tokens, -1, dtype=np.int64)  # [N] last such step, -1 if never
        self.p_last = np.zeros(n_tokens, dtype=np.float32)  # [N] p at the latest step
        self.count = 0

    def update(self, p: np.ndarray) -> None:
        """Add one step: p is [N], the probability of the correct token at every target position."""
        p = np.asarray(p, dtype=np.float32)
        below = p <= self.tau
        self.steps_below += below
        self.last_below[below] = self.count
        self.p_last = p
        self.count += 1

    def top(self, k: int = 10) -> list[dict]:
        """The k tokens that stayed at or below tau the longest (then the latest to cross, then the lowest p now):
        index, steps_below, last_below and the final p. Tokens never below tau are not stubborn and are left out."""
        if self.count == 0:
            return []
        order = np.lexsort((self.p_last, -self.last_below, -self.steps_below))
        out = []
        for i in order[:k]:
            if self.steps_below[i] == 0:
                break
            out.append({"index": int(i), "steps_below": int(self.steps_below[i]), "last_below": int(self.last_below[i]),
                        "p": float(self.p_last[i])})
        return out


def stubborn_tokens(p_history: np.ndarray, tau: float, k: int = 10) -> list[dict]:
    """The k tokens that stayed at or below tau the longest, from a whole [S, N] history (one row per recorded
    step); see StubbornCounter.top for what each entry holds."""
    p_history = np.asarray(p_history)
    if p_history.size == 0:
        return []
    counter = StubbornCounter(p_history.shape[1], tau)
    for row in p_history:
        counter.update(row)
    return counter.top(k)


def bits_per_param(bits_stored: float, p_eff: int) -> float:
    """Bits stored per trainable parameter (NaN when p_eff is 0)."""
    return bits_stored / p_eff if p_eff else math.nan


def per_sample(p: Any, correct: Any, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (a PhoneBook entry): its worst token's p [S] and whether every teacher-forced argmax of it is right
    [S] bool (recalled entry by entry). `p`, `correct`: [N] over all samples' target tokens, sample 0's first;
    `lengths`: each sample's target tokens (summing to N). Raises ValueError when they do not add up."""
    p, correct = np.asarray(p, dtype=np.float32), np.asarray(correct, dtype=bool)
    if sum(lengths) != len(p) or len(p) != len(correct) or min(lengths, default=1) < 1:
        raise ValueError(f"per_sample: the sample lengths add up to {sum(lengths)} but there are {len(p)} tokens")
    if not len(p):
        return np.zeros(0, np.float32), np.zeros(0, bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    return np.minimum.reduceat(p, starts), np.logical_and.reduceat(correct, starts)
