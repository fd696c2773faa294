"""Read-outs computed from a run's token history: stubborn tokens, capacity figures."""

from __future__ import annotations

import math

import numpy as np


def stubborn_tokens(p_history: np.ndarray, tau: float, k: int = 10) -> list[dict]:
    """The k tokens that stayed at or below tau the longest.

    p_history is [S, N] (one row per recorded step). For each token: how many recorded steps it spent at
    or below tau, the last step it was there (-1 if never), and its final p. Tokens never below tau are
    not stubborn and are left out."""
    if p_history.size == 0:
        return []
    below = p_history <= tau  # [S, N]
    steps_below = below.sum(axis=0)
    S = below.shape[0]
    last_below = np.where(below.any(axis=0), S - 1 - np.argmax(below[::-1], axis=0), -1)
    order = np.lexsort((-p_history[-1], -last_below, -steps_below))  # most steps below first, then latest to cross
    out = []
    for i in order[:k]:
        if steps_below[i] == 0:
            break
        out.append({"index": int(i), "steps_below": int(steps_below[i]), "last_below": int(last_below[i]),
                    "p": float(p_history[-1, i])})
    return out


def bits_per_param(bits_stored: float, p_eff: int) -> float:
    return bits_stored / p_eff if p_eff else math.nan
