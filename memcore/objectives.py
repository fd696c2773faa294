"""How each method weights tokens: per-token losses -> per-token weights for sft, memft-ot and memft-sw.

All rules act on detached per-token losses ``loss`` of shape [B, K] (nats) with a validity ``mask`` [B, K];
the training loss is then ``weighted_mean(loss, w) = sum(w * loss) / sum(w)``. A token is above the cut when
its loss is below -ln(tau), i.e. p(correct) > tau. ``token_weights`` is the one entry point the training loop
calls: it maps a TrainSpec and the step's detached losses to the weights, through the table ``WEIGHTS`` of
one small rule per method, so nothing outside this module names a method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from memcore.config import TrainSpec

SW_SHARPNESS = 10.0  # sigmoid slope of the memft-sw base weight
SW_DECAY = 20.0  # e-folding length (tokens) of the weight after the anchor
SW_FLOOR = 0.01  # scale of the weights beyond the window
SW_PATIENCE = 3  # steps the anchor may stay put before the window grows
SW_GROWTH = 0.5  # window growth per step, as a multiple of the base window
SW_MAX_FACTOR = 4  # the window grows to at most this multiple of the base window


def cut(tau: float) -> float:
    """Loss threshold for probability tau: p > tau  <=>  loss < -ln(tau)."""
    return -math.log(tau)


def sft_weights(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain mean cross-entropy: every target token weighs 1."""
    return mask.float()


def ot_weights(loss: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """memft-ot: w_i = 1 if loss_i > -ln(tau) else 0 (train only tokens not yet above tau)."""
    return ((loss > cut(tau)) & mask).float()


def may_train(method: str, tau: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Which tokens can carry weight in this step's update, judged from their loss alone (nats, any shape ->
    bool), or None when every target token can: memft-ot trains only tokens with loss > -ln(tau); sft and
    memft-sw (whose sigmoid weights are never zero) train all. The training loop applies it to the previous
    step's losses to guess which tokens need their LM-head gradient in this step's forward; a token that gets
    weight anyway (a guess that was wrong, or memft-ot's mean fallback) is still handled, only slower."""
    if method == "memft-ot":
        c = cut(tau)
        return lambda loss: loss > c
    return None


def first_wrong(correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the kept position of the first target whose argmax is wrong, or -1 if none ([B] long)."""
    wrong = (~correct) & mask
    K = wrong.shape[1]
    pos = torch.arange(K, device=wrong.device).expand_as(wrong)
    first = torch.where(wrong, pos, torch.full_like(pos, K)).min(dim=1).values
    return torch.where(first == K, torch.full_like(first, -1), first)


@dataclass
class SlidingWindow:
    """State of memft-sw's window: per row, the last anchor, how long it stayed, and the current width."""

    size: int = 50  # the base window width W, tokens (spec.window); a still anchor grows it up to SW_MAX_FACTOR x
    anchors: list[int] = field(default_factory=list)
    still: list[int] = field(default_factory=list)
    widths: list[float] = field(default_factory=list)

    def update(self, anchors: list[int]) -> list[float]:
        """Advance one step with this step's anchors; return each row's window width W."""
        if len(self.anchors) != len(anchors):
            self.anchors, self.still, self.widths = list(anchors), [0] * len(anchors), [float(self.size)] * len(anchors)
            return list(self.widths)
        for r, a in enumerate(anchors):
            if a != self.anchors[r]:
                self.anchors[r], self.still[r], self.widths[r] = a, 0, float(self.size)
            else:
                self.still[r] += 1
                if self.still[r] >= SW_PATIENCE:
                    self.widths[r] = min(self.widths[r] + SW_GROWTH * self.size, SW_MAX_FACTOR * self.size)
        return list(self.widths)


def sw_weights(loss: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor, tau: float,
               window: SlidingWindow) -> torch.Tensor:
    """memft-sw: w_i = sigmoid(10 (loss_i + ln tau)), then relative to the anchor a (first wrong argmax):
    unchanged before a, times exp(-(i - a)/20) for a <= i <= a + W, times 0.01 beyond a + W.
    Rows with no wrong argmax keep only the base weights."""
    w0 = torch.sigmoid(SW_SHARPNESS * (loss - cut(tau))) * mask.float()  # the base weight, before the window
    anchors = first_wrong(correct, mask)
    widths = torch.tensor(window.update(anchors.tolist()), device=loss.device, dtype=loss.dtype)
    K = loss.shape[1]
    pos = torch.arange(K, device=loss.device, dtype=loss.dtype).expand_as(loss)
    a = anchors.to(loss.dtype)[:, None]
    dist = pos - a
    scale = torch.ones_like(loss)
    in_window = (dist >= 0) & (dist <= widths[:, None])
    scale = torch.where(in_window, torch.exp(-dist / SW_DECAY), scale)
    scale = torch.where(dist > widths[:, None], torch.full_like(scale, SW_FLOOR), scale)
    scale = torch.where((anchors >= 0)[:, None], scale, torch.ones_like(scale))
    return w0 * scale


def weighted_mean(loss: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i loss_i / sum_i w_i (the caller ensures sum w > 0)."""
    return (w * loss).sum() / w.sum()


def curriculum_count(step: int, max_steps: int, n_rows: int, stages: int) -> int:
    """How many samples train at `step` under memft-sw's curriculum: the first ceil(s/stages * n_rows) in stage
    s = 1..stages, the stages being equal slices of the step budget (all rows when stages <= 1 or one row)."""
    if n_rows <= 1 or stages <= 1:
        return n_rows
    stage = min(stages, 1 + (step * stages) // max(1, max_steps))
    return math.ceil(stage * n_rows / stages)


@dataclass(frozen=True)
class Minibatch:
    """The samples one step trains under minibatching (TrainSpec.batch_size): `rows` [b] sample indices (into the
    run's samples, in data order), the epoch (counted from 0 over the whole run), the stage (1..stages of the
    memft-sw curriculum, 1 without one) and how many samples that stage trains (the first `n_active`)."""

    rows: np.ndarray
    epoch: int
    stage: int
    n_active: int


def _stage_starts(spec: TrainSpec, n_rows: int) -> list[tuple[int, int, int, int]]:
    """(first step, first epoch, n_active, steps per epoch) of each curriculum stage (one stage without one)."""
    bs = spec.batch_size
    stages = spec.curriculum_stages if (spec.method == "memft-sw" and n_rows > 1) else 1
    out, step, epoch = [], 0, 0
    for s in range(1, stages + 1):
        n_active = math.ceil(s * n_rows / stages)
        per_epoch = math.ceil(n_active / bs)
        out.append((step, epoch, n_active, per_epoch))
        if s == stages:
            break
        if spec.curriculum_epochs:  # the stage ends at this epoch (the paper's PhoneBook schedule)
            epochs = max(1, spec.curriculum_epochs[s - 1] - epoch)
        else:  # equal slices of the step budget, rounded up to whole epochs
            want = math.ceil(s * spec.max_steps / stages) - step
            epochs = max(1, math.ceil(want / per_epoch))
        step += epochs * per_epoch
        epoch += epochs
    return out


def schedule_notes(spec: TrainSpec, n_rows: int) -> list[str]:
    """Plain-words notes on settings that will not do what their flags suggest for a run of `n_rows` samples (none
    when all is well): curriculum flags that only memft-sw on several samples in minibatches uses, and a step
    budget that ends before the curriculum's later stages (whose samples then never train)."""
    notes = []
    curriculum_set = spec.curriculum_epochs is not None or spec.curriculum_stages != 5
    if curriculum_set and spec.method != "memft-sw":
        notes.append(f"--curriculum-stages/--curriculum-epochs only shape memft-sw; this {spec.method} run trains "
                     "every sample from the start")
    elif curriculum_set and (spec.batch_size is None or n_rows < 2):
        notes.append("the curriculum only applies to several samples trained in minibatches (--batch-size); this "
                     "run trains " + ("one sample" if n_rows < 2 else "all samples every step") + " without it")
    if spec.batch_size is None or spec.method != "memft-sw" or n_rows < 2:
        return notes
    starts = _stage_starts(spec, n_rows)
    reached = [st for st in starts if st[0] < spec.max_steps]
    if len(reached) < len(starts):
        first_missed = starts[len(reached)]
        notes.append(f"the step budget ({spec.max_steps}) ends in curriculum stage {len(reached)} of {len(starts)}: "
                     f"only the first {reached[-1][2]} of {n_rows} samples ever train (stage {len(reached) + 1} "
                     f"would start at step {first_missed[0]}); raise --max-steps or lower --curriculum-epochs")
    return notes


def minibatch(step: int, n_rows: int, spec: TrainSpec) -> Minibatch:
    """Which samples train at `step` when the run trains in minibatches of spec.batch_size samples.

    Each epoch is one pass over the samples its stage trains, in an order reshuffled every epoch (a permutation
    drawn from the run's seed and the epoch number: the same run gets the same batches, so a resumed run goes on
    exactly); the last batch of an epoch holds what is left. memft-sw on several samples is the paper's
    inter-batch temporal curriculum: the samples enter in spec.curriculum_stages stages, stage s training the first
    ceil(s/stages · n) of them in data order, each stage ending at the epoch spec.curriculum_epochs gives (the
    paper's PhoneBook at 1-2k answer tokens: 20, 40, 60, 80, the last stage running to the step budget) or, without
    it, after an equal share of the step budget (rounded up to whole epochs). Other methods train every sample from
    the start."""
    starts = _stage_starts(spec, n_rows)
    stage = max(i for i, st in enumerate(starts) if st[0] <= step)
    first_step, first_epoch, n_active, per_epoch = starts[stage]
    e, k = divmod(step - first_step, per_epoch)
    epoch = first_epoch + e
    order = np.random.default_rng([int(spec.seed) & 0xFFFFFFFF, epoch]).permutation(n_active)
    bs = spec.batch_size
    return Minibatch(rows=np.sort(order[k * bs:(k + 1) * bs]), epoch=epoch, stage=stage + 1, n_active=n_active)


@dataclass
class StepLosses:
    """What a weighting rule may read about the adapter's current state.

    loss: [B, K] detached per-token cross-entropy (nats, 0 off the mask) on the device.
    correct: [B, K] bool, teacher-forced argmax == target, on the device.
    mask: [B, K] bool, target positions.
    host_loss: [N] float32 host copy of the N target losses (row-major) that may carry weight, for counting
    without a device sync.
    step: optimizer updates applied so far.
    own_rows: a run trained after another: its own rows come first, the earlier runs' after them (rehearsed, or
    off the mask); memft-sw's curriculum counts the own rows only. None: every row is the run's own."""

    loss: torch.Tensor
    correct: torch.Tensor
    mask: torch.Tensor
    host_loss: np.ndarray
    step: int
    own_rows: int | None = None


def _sft(spec: TrainSpec, s: StepLosses, window: SlidingWindow) -> tuple[torch.Tensor, int]:
    return sft_weights(s.loss, s.mask), int(s.host_loss.shape[0])


def _memft_ot(spec: TrainSpec, s: StepLosses, window: SlidingWindow) -> tuple[torch.Tensor, int]:
    active = int((s.host_loss > cut(spec.tau)).sum())  # counted on the host copy: no further device sync
    if active == 0 and spec.ot_when_empty == "mean":  # nothing below tau: fall back to the plain mean
        return _sft(spec, s, window)
    return ot_weights(s.loss, s.mask, spec.tau), active


def _memft_sw(spec: TrainSpec, s: StepLosses, window: SlidingWindow) -> tuple[torch.Tensor, int]:
    w = sw_weights(s.loss, s.correct, s.mask, spec.tau, window)
    n_rows = s.loss.shape[0]
    own = n_rows if s.own_rows is None else s.own_rows  # rows after the run's own: earlier targets, never delayed
    n_train = own if spec.batch_size is not None else \
        curriculum_count(s.step, spec.max_steps, own, spec.curriculum_stages)
    if n_train < own:  # the curriculum's later samples wait for their stage
        rows = torch.arange(n_rows, device=w.device)
        w = w * ((rows < n_train) | (rows >= own)).to(w.dtype)[:, None]
    return w, int((w > 0).sum())


WEIGHTS: dict[str, Callable[[TrainSpec, StepLosses, SlidingWindow], tuple[torch.Tensor, int]]] = {
    "sft": _sft,
    "memft-ot": _memft_ot,
    "memft-sw": _memft_sw,
}


def token_weights(spec: TrainSpec, losses: StepLosses, window: SlidingWindow) -> tuple[torch.Tensor, int]:
    """This step's token weights [B, K] (float, >= 0, 0 off the mask) for `spec.method`, and how many tokens
    carry weight (0: nothing to learn, the caller skips the update). memft-sw advances `window` by one step.

    Raises MemcoreError for a method with no rule (TrainSpec validation normally catches it first)."""
    rule = WEIGHTS.get(spec.method)
    if rule is None:
        from memcore.config import MemcoreError

        raise MemcoreError(f"no token-weighting rule for method {spec.method!r} (known: {', '.join(WEIGHTS)})")
    return rule(spec, losses, window)
