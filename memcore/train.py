"""The one streaming core: ``train_iter`` yields a StepReport per optimizer step; ``train`` consumes it.

Step k's report describes the adapter after k updates, measured (memcore.measure) by the very forward pass
that then computes step k+1's gradient, so tracking costs no extra forward. The loop has three parts: measure,
the stop policy, and the update (whose token weights memcore.objectives chooses). When the teacher-forced
argmax says "recalled", and at the end of every run, a real greedy decode confirms it, and a disagreement is
reported rather than hidden. Also here: the frozen-prefix cache, block recomputation, and checkpoints.
"""

from __future__ import annotations

import itertools
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memcore import objectives as obj
from memcore.config import AdapterSpec, MemcoreError, TrainSpec
from memcore.data import Batch, make_batch
from memcore.measure import (
    NO_GRAD_TOKENS,
    StepReport,
    compare,
    fill_earlier,
    fill_report,
    greedy_generate,
    read_targets,
    rows_of_batch,
    token_losses,
)
from memcore.placement import Placement, placement_of
from memcore.stack import AdapterStack, SlotAdamW

# --- frozen-prefix cache -------------------------------------------------------------------------------------


class FrozenPrefix:
    """When no adapter sits below block k, the hidden states entering block k never change for a fixed
    input: compute them once, then let blocks 0..k-1 pass them through. Backward stops at block k too."""

    def __init__(self, placement: Placement, k: int):
        self.layers = placement.layers
        self.k = k
        self.output: Any = None  # what block k-1 returned for the full batch

    @classmethod
    def maybe(cls, model: Any) -> FrozenPrefix | None:
        """A FrozenPrefix for `model` when the blocks below its lowest adapted block hold nothing
        trainable, else None."""
        placement = placement_of(model)
        k = placement.lowest_adapted
        if k is None or k < 1 or placement.trainable_below_blocks:
            return None
        return cls(placement, k)

    def capture(self, model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the batch once and keep what block k-1 returns; returns that forward's per-token loss [B, K] (nats)
        and argmax-correct [B, K]."""
        last: list[Any] = [None]  # the latest forward's (a model may run a small probe forward first)

        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            if isinstance(out, tuple):
                last[0] = tuple(o.detach() if torch.is_tensor(o) else o for o in out)
            else:
                last[0] = out.detach()

        # many samples (a PhoneBook) in row chunks, as token_losses measures them, each chunk's states kept
        B, T = batch.input_ids.shape
        step = max(1, NO_GRAD_TOKENS // T)
        parts, losses, correct = [], [], []
        h = self.layers[self.k - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                for i in range(0, B, step):
                    loss, right = token_losses(model, rows_of_batch(batch, slice(i, i + step)))
                    parts.append(last[0])
                    losses.append(loss)
                    correct.append(right)
        finally:
            h.remove()
        self.output = parts[0] if len(parts) == 1 else _joined(parts)
        return torch.cat(losses), torch.cat(correct)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, blocks 0..k-1 pass the captured hidden states through."""
        out = self.output
        as_tuple = isinstance(out, tuple)

        def passthrough(_self: Any, *args: Any, **kwargs: Any) -> Any:
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) if as_tuple else h

        def cached(_self: Any, *args: Any, **kwargs: Any) -> Any:
            return out

        blocks = list(self.layers)[: self.k]
        for i, block in enumerate(blocks):
            block.forward = types.MethodType(cached if i == self.k - 1 else passthrough, block)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward


# saved activations per token per block, in units of hidden_size (measured, Llama-style)
ACTIVATION_FLOATS_PER_TOKEN = 24
RECOMPUTE_ABOVE_BYTES = 768 * 2**20  # 'auto' recomputes when the blocks' saved activations would exceed this


def use_recompute(model: Any, batch: Batch, setting: str, start: int) -> bool:
    """Whether to recompute blocks `start`.. in the backward: 'on', 'off', or 'auto' (when their saved
    activations, estimated as tokens x blocks x 24 x hidden x element size in bytes, exceed
    RECOMPUTE_ABOVE_BYTES: at the `paper` placement on the default model, from about 1,400 tokens).
    Recomputing costs about one more forward of those blocks (4.6 -> 6.3 s per step at 2,048 tokens here) and
    saves most of their activation memory (2,048 tokens: peak RSS 2.1 -> 1.4 GB)."""
    if setting != "auto":
        return setting == "on"
    n_blocks = len(placement_of(model).layers) - start
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 0
    elem = next(model.parameters()).element_size()
    est = batch.input_ids.numel() * n_blocks * ACTIVATION_FLOATS_PER_TOKEN * hidden * elem
    return est > RECOMPUTE_ABOVE_BYTES


@contextmanager
def recomputed(model: Any, start: int) -> Iterator[None]:
    """Blocks `start`.. keep only their inputs for the backward and recompute their insides there
    (activation checkpointing, non-reentrant, RNG preserved so LoRA dropout repeats). Active only while
    grad mode is on; memory then holds one block's activations instead of every block's."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(placement_of(model).layers)[start:]
    saved = [vars(b).get("forward") for b in blocks]

    def wrap(fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return fn(*args, **kwargs)
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return run

    for b in blocks:
        b.forward = wrap(b.forward)
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything the loop needs to continue a run exactly where it was: the adapter after `step` updates, the
    optimizer's moments, memft-sw's window, the dropout generator, and the clocks. Saved by the runner every few
    minutes.

    adapter: '<module>.A' [in, r] and '<module>.B' [r, out] (memcore.stack.AdapterStack.state); optimizer:
    {'step', 'exp_avg', 'exp_avg_sq'} by the same names (SlotAdamW.state). Checkpoints of older versions (PEFT
    parameter names, torch.optim.AdamW's state dict) are read as well."""

    step: int  # updates applied
    adapter: dict[str, torch.Tensor]  # the run's adapter by tensor name, on the CPU
    optimizer: dict[str, Any]
    window: dict[str, Any]
    rng: torch.Tensor | None  # the run's dropout generator state at the top of `step` (None: no dropout)
    cuda_rng: list[torch.Tensor] | None
    elapsed: float  # seconds of training so far
    generate_seconds: float
    last_check_step: int
    notes: list[str] = field(default_factory=list)
    recent_delta_loss: list[float] = field(default_factory=list)  # ΔL of the latest steps, for until='converged'
    best_counts: list[int] = field(default_factory=list)  # BestCounts.saved()


PLATEAU_SMOOTH = 10  # ΔL is averaged over this many steps at each end of the plateau window (dropout makes it noisy)


@dataclass
class BestCounts:
    """The most tokens above τ and argmax-right a run has had, and the step it last beat either
    (plateau_on='recall'). A rehearsing run keeps two sets of bests: over the whole set it trains (its own targets
    and the earlier runs') and over its own targets alone, since the earlier targets start out learned and the
    whole set's best is often step 0 while the new passage is still going in."""

    above: int = -1
    correct: int = -1
    step: int = 0
    own_above: int = -1
    own_correct: int = -1

    def see(self, report: StepReport, with_earlier: bool = False) -> None:
        """Take a step's counts (with_earlier: the earlier runs' targets counted too, as a rehearsing run trains
        them): a new best in any count moves the step of the last new best."""
        above, correct = report.n_above, report.n_correct
        gained = above > self.own_above or correct > self.own_correct
        self.own_above, self.own_correct = max(self.own_above, above), max(self.own_correct, correct)
        if with_earlier and report.earlier_p is not None:
            above += report.earlier_above
            correct += int(report.earlier_correct.sum())
        if above > self.above or correct > self.correct:
            gained = True
        self.above, self.correct = max(self.above, above), max(self.correct, correct)
        if gained:
            self.step = report.step

    def saved(self) -> list[int]:
        """The counts as a checkpoint keeps them (BestCounts(*saved) restores them)."""
        return [self.above, self.correct, self.step, self.own_above, self.own_correct]


def waits_for_a_new_best(counts: Iterable[tuple[int, int, int]]) -> tuple[list[int], int]:
    """How long a run waited, again and again, for a new best in tokens above τ or argmax-right tokens: the recall
    plateau rule's view of its curve (BestCounts on a run's own targets).

    counts: (step, n_above, n_correct) per recorded step, in step order (a run's scalar step rows).
    Returns (waits, last): the steps between each new best and the one before it (a wait that ended in a new best)
    and the steps from the last new best to the last row (the wait still open when the run ended). A plateau window
    of W steps would have stopped the run early, before a later gain, exactly when some wait is longer than W."""
    best = BestCounts()
    waits: list[int] = []
    last_step = 0
    for step, above, correct in counts:
        before = best.step
        best.see(types.SimpleNamespace(step=step, n_above=above, n_correct=correct, earlier_p=None))
        if best.step != before:
            waits.append(step - before)
        last_step = step
    return waits, last_step - best.step


def converged(report: StepReport, recent: deque[float], spec: TrainSpec, best: BestCounts | None = None,
              with_earlier: bool = False) -> str | None:
    """Why a run has converged, or None: 'all_above_tau' when every target token has p > tau; 'plateau' when
    (plateau_on='delta_loss') the mean ΔL of the last PLATEAU_SMOOTH steps exceeds that of the PLATEAU_SMOOTH steps
    plateau_window steps earlier by less than plateau_tol nats, or (plateau_on='recall') when neither the tokens
    above τ nor the argmax-right tokens have reached a new best for plateau_window steps (`best`, which has seen
    this step). `recent` holds the latest ΔL values (this step's last). with_earlier: a rehearsing run, whose
    'all_above_tau' needs the earlier runs' targets above τ as well."""
    earlier_done = (not with_earlier or report.earlier_p is None
                    or report.earlier_above == int(report.earlier_p.shape[0]))
    if report.n_above == report.n_tokens and earlier_done:
        return "all_above_tau"
    if spec.plateau_on == "recall":
        return "plateau" if best is not None and report.step - best.step >= spec.plateau_window else None
    if len(recent) < spec.plateau_window + PLATEAU_SMOOTH:
        return None
    values = list(recent)
    gain = sum(values[-PLATEAU_SMOOTH:]) / PLATEAU_SMOOTH - sum(values[:PLATEAU_SMOOTH]) / PLATEAU_SMOOTH
    return "plateau" if gain < spec.plateau_tol else None


@dataclass
class RunInput:
    """One run for the loop: its own batch (its samples, on the loop's device), how it trains, its adapter (the
    kind and placement the loop's stack holds, with the run's rank, alpha and dropout), and its hooks.

    base_loss: [B, K] per-token base loss of `batch` (nats), measured when None (for all the runs joining at a step
    in one forward, which also lays the frozen prefix). started: called with the base loss once it is known,
    before the run's first report. resume: a Checkpoint to go on from. checkpoint: called with the run's whole
    state every spec.checkpoint_every seconds and when it stops short. should_stop: polled once per step
    (cooperative stop: the adapter trained so far is kept)."""

    batch: Batch
    spec: TrainSpec
    adapter: AdapterSpec
    base_loss: torch.Tensor | None = None
    resume: Checkpoint | None = None
    checkpoint: Callable[[Checkpoint], None] | None = None
    should_stop: Callable[[], bool] | None = None
    started: Callable[[torch.Tensor], None] | None = None
    tag: Any = None  # the caller's name for the run (given back with its reports)
    # a run trained after another (TrainSpec.after): the batch's first `own_samples` samples are the run's own, the
    # rest the earlier runs' targets (measured at every step; trained only when spec.keep); None: all its own
    own_samples: int | None = None
    init_adapter: dict[str, torch.Tensor] | None = None  # the adapter it starts from (AdapterStack.state), not fresh


class _Run:
    """One run's state in the loop: its slot and rows, its clocks, memft-sw window, convergence history."""

    def __init__(self, inp: RunInput, slot: int, loop: _Loop) -> None:
        self.inp, self.spec, self.batch, self.slot = inp, inp.spec, inp.batch, slot
        self.tag = inp.tag
        self.where = inp.batch.target_mask.flatten().nonzero()[:, 0]  # flat target positions in its own [B, K]
        self.base_np = None  # [N] base loss per target token (nats): set_base_loss, before the first report
        self.may_train = obj.may_train(self.spec.method, self.spec.tau)
        self.prev_loss: torch.Tensor | None = None  # [B, K] latest per-token loss, to guess who trains next
        if inp.base_loss is not None:
            self.set_base_loss(inp.base_loss)
        self.window = obj.SlidingWindow(size=self.spec.window)
        self.dropout = inp.adapter.dropout > 0
        self.step, self.last_check_step, self.gen_seconds, self.notes, elapsed0 = 0, -10**9, [0.0], [], 0.0
        self.recent: deque[float] = deque(maxlen=self.spec.plateau_window + PLATEAU_SMOOTH)
        self.best = BestCounts()
        if inp.resume is not None:
            loop.restore(self, inp.resume)
            self.step, self.last_check_step, elapsed0 = inp.resume.step, inp.resume.last_check_step, inp.resume.elapsed
            self.gen_seconds, self.notes = [inp.resume.generate_seconds], list(inp.resume.notes)
            self.recent.extend(inp.resume.recent_delta_loss)
            if inp.resume.best_counts:
                self.best = BestCounts(*inp.resume.best_counts)
        self.t0 = time.perf_counter() - elapsed0
        self.last_saved = time.perf_counter()
        self.first_step = self.step
        self.measured = -1  # the last step whose ΔL is in `recent`
        self.rng: torch.Tensor | None = None  # dropout generator state at the top of the current step
        self.rows = range(0)  # its rows in the loop's batch (set by the loop)
        self.full_rows: range | None = None  # its rows in the loop's laid-out batch of every sample
        # minibatches (spec.batch_size): each step forwards and trains some of its samples; its reports keep every
        # sample's latest measurement in cur_loss / cur_correct [N] (host), refreshed where a step measured it
        self.mb = self.spec.batch_size is not None and self.n_rows > 1
        self.local = torch.arange(self.n_rows)  # its samples in this step's batch (all without minibatches)
        self.minibatch: obj.Minibatch | None = None
        lengths = [len(s.target_ids) for s in self.batch.samples]
        self.offsets = [0, *itertools.accumulate(lengths)]  # sample i's targets: [offsets[i], offsets[i+1]) of [N]
        self.flat_sel: np.ndarray | None = None  # the selected samples' positions in [N]
        self.where_sel = self.where  # flat target positions in its rows of this step's batch
        self.cur_loss: np.ndarray | None = None
        self.cur_correct: np.ndarray | None = None
        self.prev_full: torch.Tensor | None = None  # [B, K] latest loss of every sample (minibatches)
        # earlier targets (TrainSpec.after): rows from own_rows on; own tokens are the first n_own of [N]
        self.own_rows = self.n_rows if inp.own_samples is None else int(inp.own_samples)
        self.n_own = self.offsets[self.own_rows]
        self.chained = self.own_rows < self.n_rows
        self.rehearse = self.chained and bool(self.spec.keep)
        self.trainable = torch.arange(self.n_rows) < (self.n_rows if self.rehearse else self.own_rows)  # [B] rows
        self.trainable_flat = np.repeat(self.trainable.numpy(), lengths)  # [N] target tokens that may carry weight

    def set_base_loss(self, base_loss: torch.Tensor) -> None:
        """The run's base loss [B, K] (nats, adapter off), the reference of its ΔL."""
        self.base_np = read_targets(base_loss, self.batch.target_mask, self.where)[0]
        self.prev_loss = base_loss.detach()
        if self.inp.started is not None:
            self.inp.started(base_loss)

    @property
    def n_rows(self) -> int:
        return int(self.batch.input_ids.shape[0])

    @property
    def keep(self) -> int:
        return self.batch.keep

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """Its rows and its own last K target positions of a [R, K_batch] tensor of the loop: [B, K]."""
        return x[self.rows.start:self.rows.stop, x.shape[1] - self.keep:]


class _Loop:
    """The state of the training loop over a set of runs sharing one frozen base, and its parts, each readable on
    its own:

    - ``measure``: one forward of every run's rows at their current adapters -> a StepReport per run;
    - ``stop_reason`` / ``finish``: each run's stop policy, and a final report's clean re-measure and generate check;
    - ``update``: each run's token weights (memcore.objectives.token_weights) -> one backward, one step per slot.

    A run alone is a loop of one run. Runs join (``add``) and leave (``remove``) between steps; their rows are laid
    in one left-padded batch, and each run reads only its own rows and its own K target positions back, so its
    numbers are those it gets alone (to float tolerance: padding changes summation order, nothing else)."""

    def __init__(self, model: Any, stack: AdapterStack, pad_id: int, use_prefix_cache: bool = True) -> None:
        model.eval()
        self.model, self.stack, self.pad_id, self.use_prefix_cache = model, stack, pad_id, use_prefix_cache
        self.opt = SlotAdamW(stack.parameters(), stack.n_slots)
        self.runs: list[_Run] = []
        self.batch: Batch | None = None
        self.full: Batch | None = None  # every run's every sample, as laid out (the batch unless minibatches cut it)
        self.full_prefix: Any = None  # the frozen prefix's output for `full`
        self.prefix: FrozenPrefix | None = None
        self.recompute = False
        self.changed = False  # runs joined or left since the batch was laid out
        # (loss, correct) [R, K] of the last forward, kept while no adapter and no dropout mask changed since (every
        # run skipped its update): the next measure reuses it; None means run the forward
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- runs joining and leaving --

    def add(self, inp: RunInput, slot: int | None = None) -> _Run:
        """Start a run in a free slot (the adapter initialised from its seed, or its checkpoint's), between steps; it
        joins the batch at the next step (``layout``)."""
        free = self.stack.free_slots()
        if slot is None:
            if not free:
                raise MemcoreError("no free slot in this batch")
            slot = free[0]
        if self.stack.slots[slot] is None:
            self.stack.assign(slot, inp.adapter, inp.spec.seed)
        if inp.init_adapter is not None and inp.resume is None:  # trained after another run: from its adapter
            self.stack.load(slot, inp.init_adapter)
        self.opt.reset(slot)
        run = _Run(inp, slot, self)
        self.runs.append(run)
        self.changed = True
        return run

    def remove(self, run: _Run) -> None:
        """A finished run leaves: its slot is freed for the next one (the batch is laid out anew at the next step)."""
        self.runs.remove(run)
        self.stack.release(run.slot)
        self.opt.reset(run.slot)
        self.changed = True

    def layout(self) -> None:
        """When runs joined or left: lay every run's rows in one batch (left-padded to the longest) and route them;
        then one forward without the adapters gives the frozen prefix and the base loss of each run that lacks
        one (every run joining at a step measured together)."""
        if not self.changed:
            return
        self.changed, self.last = False, None
        if not self.runs:
            self.batch, self.prefix, self.full = None, None, None
            return
        samples, start = [], 0
        for r in self.runs:
            r.rows = range(start, start + r.n_rows)
            start += r.n_rows
            samples += r.batch.samples
        device = self.runs[0].batch.input_ids.device
        self.batch = make_batch(samples, self.pad_id).to(device)
        self.stack.set_rows([r.slot for r in self.runs for _ in range(r.n_rows)])
        self.prefix = FrozenPrefix.maybe(self.model) if self.use_prefix_cache else None
        new = [r for r in self.runs if r.base_np is None]
        if self.prefix is not None or new:
            with self.stack.disabled(), torch.no_grad():  # no adapter sits below the prefix: the same either way
                loss, correct = self.prefix.capture(self.model, self.batch) if self.prefix is not None else \
                    token_losses(self.model, self.batch)
            for r in new:
                r.set_base_loss(r.view(loss))
                if r.mb and r.inp.resume is None:  # a new adapter adds nothing yet: every sample is at its base
                    r.cur_loss, r.cur_correct = read_targets(r.view(loss), r.view(correct), r.where)
                    r.prev_full = r.view(loss).detach().clone()
        spec = self.runs[0].spec
        self.recompute = use_recompute(self.model, self.batch, spec.recompute, self.prefix.k if self.prefix else 0)
        self.full, self.full_prefix = self.batch, (self.prefix.output if self.prefix is not None else None)
        for r in self.runs:
            r.full_rows = r.rows
            if r.mb and r.cur_loss is None:  # every sample measured once (its adapter as it starts or resumes)
                loss, correct = self._alone(r)
                r.cur_loss, r.cur_correct = read_targets(loss, correct, r.where)
                r.prev_full = loss.detach()

    def select(self) -> None:
        """With minibatches: this step's batch is the samples each run trains now (memcore.objectives.minibatch;
        all of a run without them), cut from the laid-out batch with their frozen-prefix states."""
        if not any(r.mb for r in self.runs):
            return
        idx, start = [], 0
        for r in self.runs:
            if r.mb:
                r.minibatch = obj.minibatch(r.step, r.n_rows, r.spec)
                r.local = torch.as_tensor(r.minibatch.rows, dtype=torch.long)
                r.flat_sel = np.concatenate([np.arange(r.offsets[i], r.offsets[i + 1]) for i in r.minibatch.rows])
                r.where_sel = r.batch.target_mask[r.local].flatten().nonzero()[:, 0]
            idx.append(r.full_rows.start + r.local)
            r.rows = range(start, start + len(r.local))
            start += len(r.local)
        sel = torch.cat(idx).to(self.full.input_ids.device)
        f = self.full
        self.batch = Batch(f.input_ids[sel], f.attention_mask[sel], f.position_ids[sel], f.labels[sel],
                           f.target_mask[sel], [f.samples[i] for i in sel.tolist()])
        if self.prefix is not None:
            self.prefix.output = _rows_of(self.full_prefix, sel, f.input_ids.shape[0])
        self.stack.set_rows([r.slot for r in self.runs for _ in range(len(r.local))])
        self.last = None

    # -- checkpoints --

    def capture(self, run: _Run) -> Checkpoint:
        """The run's whole state (continuing from it reproduces the rest of the run)."""
        # the checkpoint restarts at `step`, whose ΔL is appended again on resume: keep only the steps before it
        recent = list(run.recent)[:-1] if run.measured == run.step else list(run.recent)
        names = self.stack.parameter_names()
        slot = self.stack.slots[run.slot]
        return Checkpoint(step=run.step, adapter=self.stack.state(run.slot),
                          optimizer=self.opt.state(run.slot, names, slot.rank), window=dict(vars(run.window)),
                          rng=run.rng, cuda_rng=None, elapsed=time.perf_counter() - run.t0,
                          generate_seconds=run.gen_seconds[0], last_check_step=run.last_check_step,
                          notes=list(run.notes), recent_delta_loss=[float(x) for x in recent],
                          best_counts=run.best.saved())

    def restore(self, run: _Run, ckpt: Checkpoint) -> None:
        """Put a checkpoint's adapter, optimizer, window and dropout generator into the run's slot."""
        slot = self.stack.slots[run.slot]
        adapter, optimizer = _current_format(ckpt, self.stack)
        self.stack.load(run.slot, adapter)
        self.opt.load(run.slot, optimizer, self.stack.parameter_names(), slot.rank)
        for k, v in ckpt.window.items():
            setattr(run.window, "size" if k == "base" else k, v)  # "base": the width's name in older checkpoints
        if ckpt.rng is not None and slot.generator is not None and ckpt.rng.dtype == torch.uint8:
            try:
                slot.generator.set_state(ckpt.rng)
            except RuntimeError:  # an older checkpoint's global RNG state: the dropout stream starts afresh
                pass

    def save(self, run: _Run) -> None:
        """Hand the run's whole state to its checkpoint hook."""
        if run.inp.checkpoint is not None:
            run.inp.checkpoint(self.capture(run))
        run.last_saved = time.perf_counter()

    def begin_step(self) -> None:
        """Lay out the batch if runs joined or left (and pick this step's minibatches); record each run's dropout
        generator state at the top of the step, and save the checkpoints due."""
        self.layout()
        self.select()
        for run in self.runs:
            gen = self.stack.slots[run.slot].generator
            run.rng = gen.get_state() if gen is not None and run.inp.checkpoint is not None else None
            if (run.inp.checkpoint is not None and run.spec.checkpoint_every and run.step > run.first_step
                    and time.perf_counter() - run.last_saved >= run.spec.checkpoint_every):
                self.save(run)

    # -- how a step is measured --

    def measure(self) -> tuple[list[StepReport], list[obj.StepLosses], torch.Tensor]:
        """One forward of every run's rows (dropout on where a run has it; reused when nothing changed since the
        last) -> each run's report and what its weighting rule reads, and the per-token loss [R, K] (nats, with
        grad) the update backpropagates. One device-to-host copy for all runs."""
        self.stack.set_dropout(any(r.dropout for r in self.runs))
        if self.last is None:
            self.stack.new_forward()
            k = self.prefix.k if self.prefix is not None else 0
            with (self.prefix.installed() if self.prefix is not None else nullcontext(),
                  recomputed(self.model, k) if self.recompute else nullcontext()):
                self.last = token_losses(self.model, self.batch, self._expected_rows())
            for r in self.runs:
                r.prev_loss = r.view(self.last[0]).detach()
                if r.mb:
                    r.prev_full[r.local.to(r.prev_full.device)] = r.prev_loss
        loss, correct = self.last
        flat = [r.view(loss.detach()).flatten()[r.where_sel] for r in self.runs]
        flat_c = [r.view(correct).flatten()[r.where_sel] for r in self.runs]
        host = torch.cat([torch.cat(flat).float(), torch.cat(flat_c).float()]).cpu().numpy()
        n_all = sum(int(f.numel()) for f in flat)
        reports, losses, at = [], [], 0
        for r, f in zip(self.runs, flat):
            n = int(f.numel())
            fl, fc = host[at:at + n], host[n_all + at:n_all + at + n] > 0.5
            at += n
            sel_loss = fl
            if r.mb:  # every sample as last measured, this step's afresh
                r.cur_loss[r.flat_sel], r.cur_correct[r.flat_sel] = fl, fc
                fl, fc = r.cur_loss.copy(), r.cur_correct.copy()
            report = StepReport(step=r.step, loss=0.0, delta_loss=0.0, p=fl, correct=fc, n_above=0, n_correct=0,
                                active=0, recalled=False, first_divergence=None, elapsed=time.perf_counter() - r.t0,
                                lr=r.spec.lr * max(0.0, 1.0 - r.step / r.spec.max_steps), bits_stored=0.0,
                                notes=r.notes)
            self._fill(r, report, fl, fc)
            if r.mb:
                report.batch_rows, report.epoch = r.minibatch.rows.tolist(), r.minibatch.epoch
            r.recent.append(report.delta_loss)
            r.best.see(report, r.rehearse)
            r.measured = r.step
            reports.append(report)
            mask = r.view(self.batch.target_mask)
            if r.chained:  # the earlier runs' rows carry no weight unless rehearsed
                mask = mask & r.trainable[r.local].to(mask.device)[:, None]
                sel_loss = sel_loss[r.trainable_flat[r.flat_sel] if r.mb else r.trainable_flat]
            losses.append(obj.StepLosses(loss=r.view(loss.detach()), correct=r.view(correct), mask=mask,
                                         host_loss=sel_loss, step=r.step,
                                         own_rows=int((r.local < r.own_rows).sum()) if r.chained else None))
        return reports, losses, loss

    @staticmethod
    def _fill(run: _Run, report: StepReport, fl: np.ndarray, fc: np.ndarray) -> None:
        """A report's measurements from every target of the run ([N] losses, nats; argmax-correct): its own, and
        the earlier runs' apart (StepReport.earlier_*)."""
        n = run.n_own
        fill_report(report, fl[:n], fc[:n], run.base_np[:n], run.spec.tau)
        if run.chained:
            fill_earlier(report, fl[n:], fc[n:], run.spec.tau)

    def _expected_rows(self) -> torch.Tensor | None:
        """[R, K] bool: the tokens expected to carry weight in this step's update (each run's guess from its
        previous losses, memcore.objectives.may_train), None when every token may."""
        if all(r.may_train is None for r in self.runs):
            return None
        out = torch.zeros_like(self.batch.target_mask)
        K = out.shape[1]
        for r in self.runs:
            rows = slice(r.rows.start, r.rows.stop)
            mask = r.view(self.batch.target_mask)
            if r.chained:  # the earlier runs' rows carry no weight unless rehearsed
                mask = mask & r.trainable[r.local].to(mask.device)[:, None]
            if r.may_train is None or r.prev_loss is None:
                out[rows, K - r.keep:] = mask
            else:
                prev = r.prev_full[r.local.to(r.prev_full.device)] if r.mb else r.prev_loss
                out[rows, K - r.keep:] = r.may_train(prev) & mask
        return out

    # -- the stop policy --

    def stop_reason(self, run: _Run, report: StepReport) -> str | None:
        """Why the run ends at this step, or None to train on. In order: asked to stop, time limit, step budget,
        converged (when until='converged'), recalled (when stop_when_recalled, confirmed by a greedy generate at
        most every 5 steps)."""
        spec, step = run.spec, run.step
        if run.inp.should_stop is not None and run.inp.should_stop():
            return "stopped"
        if spec.max_seconds is not None and report.elapsed >= spec.max_seconds:
            return "max_seconds"
        if step >= spec.max_steps:
            return "max_steps"
        reason = converged(report, run.recent, spec, run.best, run.rehearse) if spec.until == "converged" else None
        if reason is not None:
            if reason == "all_above_tau" and (run.dropout or run.mb) and not self._all_above_without_dropout(run):
                return None  # only dropout's noise put every token above tau: train on
            return reason
        recalled = report.recalled and (not run.rehearse or bool(report.earlier_recalled))
        if recalled and spec.stop_when_recalled and not spec.verify:
            # the teacher-forced argmax is exact (greedy decoding makes the same choices); under dropout the
            # training forward's argmax is not the adapter's own, so it is measured again without
            if (run.dropout or run.mb) and not self._recalled_without_dropout(run):
                return None
            return "recalled"
        if recalled and spec.stop_when_recalled and step - run.last_check_step >= 5:
            run.last_check_step = step
            gen = self._generate_check(run, report)
            if report.generate_recalled:
                report.generated = gen
                return "recalled"
            run.notes.append(f"step {step}: teacher-forced argmax says recalled but greedy generate differs "
                             f"at token {report.generate_divergence}; training on")
        return None

    def finish(self, run: _Run, report: StepReport, reason: str) -> StepReport:
        """Turn the run's report into its final one: checkpoint an unfinished run, re-measure without dropout,
        run the greedy-generate check (when spec.verify) and note any disagreement with it."""
        if reason in ("stopped", "max_seconds"):  # unfinished: keep what continuing would need
            self.save(run)
        if run.dropout or run.mb:  # dropout in training, or samples last measured steps ago: measure them all now
            loss, correct = self._alone(run)
            self._fill(run, report, *read_targets(loss, correct, run.where))
        if report.generated is None and run.spec.verify:
            report.generated = self._generate_check(run, report)
        if report.generate_recalled is not None and report.recalled != report.generate_recalled:
            report.notes.append("teacher-forced recall and greedy generate disagree "
                                f"(argmax: {report.recalled}, generate: {report.generate_recalled})")
        report.final, report.stop_reason = True, reason
        report.elapsed = time.perf_counter() - run.t0
        report.generate_seconds = run.gen_seconds[0]
        return report

    @torch.no_grad()
    def _alone(self, run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
        """All of the run's samples through its own slot, dropout off: (loss, correct) [B, K]. From the frozen
        prefix's states when the loop holds them (only the blocks from the adapter's up run again)."""
        f, rows = self.full, getattr(run, "full_rows", None)
        if self.prefix is None or f is None or rows is None or self.full_prefix is None:
            with self.stack.routed([run.slot] * run.n_rows):
                return token_losses(self.model, run.batch)
        sel = torch.arange(rows.start, rows.stop, device=f.input_ids.device)
        batch = Batch(f.input_ids[sel], f.attention_mask[sel], f.position_ids[sel], f.labels[sel], f.target_mask[sel],
                      run.batch.samples)
        saved = self.prefix.output
        step = max(1, NO_GRAD_TOKENS // batch.input_ids.shape[1])  # many samples: a few rows at a time
        losses, rights = [], []
        try:
            for i in range(0, len(sel), step):
                part = sel[i:i + step]
                self.prefix.output = _rows_of(self.full_prefix, part, f.input_ids.shape[0])
                with self.stack.routed([run.slot]), self.prefix.installed():
                    loss, correct = token_losses(self.model, rows_of_batch(batch, slice(i, i + step)))
                losses.append(loss)
                rights.append(correct)
        finally:
            self.prefix.output = saved
        loss, correct = torch.cat(losses), torch.cat(rights)
        K = batch.keep
        return loss[:, K - run.keep:], correct[:, K - run.keep:]

    def _stop_where(self, run: _Run) -> torch.Tensor:
        """The flat target positions a stop rule judges: the run's own, and the earlier runs' when it rehearses."""
        return run.where if run.rehearse or not run.chained else run.where[:run.n_own]

    def _recalled_without_dropout(self, run: _Run) -> bool:
        _, correct = self._alone(run)
        return bool(correct.flatten()[self._stop_where(run)].all())

    def _all_above_without_dropout(self, run: _Run) -> bool:
        loss, _ = self._alone(run)
        return bool((loss.flatten()[self._stop_where(run)] < obj.cut(run.spec.tau)).all())

    def _generate_check(self, run: _Run, report: StepReport) -> list[list[int]]:
        t = time.perf_counter()
        own = run.batch.samples[:run.own_rows]  # the run's own targets (the earlier ones are judged teacher-forced)
        with self.stack.routed([run.slot]):
            gen = greedy_generate(self.model, own, self.pad_id)
        run.gen_seconds[0] += time.perf_counter() - t
        report.generate_divergence = compare(gen, own)
        report.generate_recalled = report.generate_divergence is None
        return gen

    # -- the update --

    def update(self, runs: list[_Run], reports: list[StepReport], losses: list[obj.StepLosses],
               loss: torch.Tensor) -> None:
        """One backward of the runs' summed weighted means (each run's weights chosen by its method's rule) and one
        AdamW step of each slot that trained; a run with no token carrying weight skips its update
        (report.skipped). Sets report.active. Each run's gradient reaches only its own slot."""
        total, moving, lrs, wds = None, [], [], []
        for run, report, s in zip(runs, reports, losses):
            w, report.active = obj.token_weights(run.spec, s, run.window)
            if run.chained:
                report.rehearsal = _rehearsal_share(w, run)
            if report.active == 0:  # nothing left to learn: no backward or optimizer step for this run
                report.skipped = True
            else:
                term = obj.weighted_mean(run.view(loss), w)
                total = term if total is None else total + term
                moving.append(run.slot)
                lrs.append(report.lr)
                wds.append(run.spec.weight_decay)
            run.step += 1
        if total is not None:
            self.opt.zero_grad()
            total.backward()
            self.opt.step(moving, lrs, wds)
            self.last = None
        elif any(r.dropout for r in self.runs):  # with dropout the next forward differs anyway
            self.last = None


def _rehearsal_share(w: torch.Tensor, run: _Run) -> float:
    """The share of a chained run's update weight [B, K] (this step's rows) on the earlier runs' targets: 0.0
    without rehearsal, or when no token carries weight."""
    if not run.rehearse:
        return 0.0
    earlier = (run.local >= run.own_rows).to(w.device)  # this step's rows (all of them without minibatches)
    total = float(w.sum())
    return float(w[earlier].sum()) / total if total > 0 else 0.0


def _joined(parts: list[Any]) -> Any:
    """Block outputs of consecutive row chunks (tensors [b, T, H], or tuples holding them) as one, rows in order."""
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(col) if torch.is_tensor(col[0]) and col[0].dim() > 0 else col[0] for col in zip(*parts))
    return torch.cat(parts)


def _rows_of(out: Any, sel: torch.Tensor, n_rows: int) -> Any:
    """A block's output (a tensor [B, T, H] or a tuple holding one) cut to the batch rows `sel`."""
    def cut(o: Any) -> Any:
        return o[sel] if torch.is_tensor(o) and o.dim() > 0 and o.shape[0] == n_rows else o

    return tuple(cut(o) for o in out) if isinstance(out, tuple) else cut(out)


def _current_format(ckpt: Checkpoint, stack: AdapterStack) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's adapter and optimizer state by the stack's tensor names. Older checkpoints held PEFT's
    parameter names ('<module>.lora_A.default.weight' [r, in], '.lora_B...' [out, r]) or the old bypass's
    ('<mlp>.bypass_A' [in, r], '.bypass_B' [r, out]) and torch.optim.AdamW's state dict, in the same order.
    Raises MemcoreError when the checkpoint does not fit the stack."""
    names = stack.parameter_names()
    if set(ckpt.adapter) == set(names):
        return ckpt.adapter, ckpt.optimizer

    def rename(key: str) -> tuple[str, bool]:  # (stack name, transposed)
        k = key.removeprefix("base_model.model.").removeprefix("base_model.")
        for old, new, t in ((".lora_A.default.weight", ".A", True), (".lora_B.default.weight", ".B", True),
                            (".bypass_A", ".A", False), (".bypass_B", ".B", False)):
            if k.endswith(old):
                return k[: -len(old)] + new, t
        return k, False

    renamed = {}
    order = []
    for key, value in ckpt.adapter.items():
        new, transposed = rename(key)
        renamed[new] = value.T.contiguous() if transposed else value
        order.append((new, transposed))
    if set(renamed) != set(names):
        odd = sorted(set(renamed) ^ set(names))[:1]
        raise MemcoreError(f"the checkpoint does not fit this adapter (e.g. {odd})")
    opt = ckpt.optimizer
    if "state" in opt:  # torch.optim.AdamW.state_dict(): params numbered in the adapter's order
        state = opt["state"]
        step = int(next(iter(state.values()))["step"]) if state else 0
        converted: dict[str, Any] = {"step": step, "exp_avg": {}, "exp_avg_sq": {}}
        for i, (new, transposed) in enumerate(order):
            for key in ("exp_avg", "exp_avg_sq"):
                t = state[i][key] if i in state else torch.zeros_like(renamed[new].T if transposed else renamed[new])
                converted[key][new] = t.T.contiguous() if transposed else t
        opt = converted
    return renamed, opt


def train_many(model: Any, stack: AdapterStack, runs: Iterable[RunInput], *, pad_id: int = 0, slots: int | None = None,
               use_prefix_cache: bool = True) -> Iterator[tuple[Any, StepReport]]:
    """Train several runs together on one frozen base, yielding (run tag, StepReport) for every run at every step,
    and each run's final report when it ends (its `adapter` holds the run's final adapter, AdapterStack.state:
    write it with AdapterStack.write); a run that ends leaves the batch at once and the next of `runs` takes its
    slot. At most `slots` runs (default: the stack's slots) train at a time.

    `model` is the base with `stack` attached (memcore.stack.AdapterStack); every RunInput's adapter shares the
    stack's kind and placement. Each run gets exactly the numbers it gets alone (train_iter), to float tolerance,
    dropout aside (its masks come from its own generator, drawn over the batch's padded length). `runs` is read
    lazily, after the consumer has seen the reports so far (a run's next may depend on how the last ended); it may
    give None for "nothing ready yet", while some run is still training."""
    loop = _Loop(model, stack, pad_id, use_prefix_cache)
    pending = iter(runs)
    limit = min(slots or stack.n_slots, stack.n_slots)
    end = object()
    exhausted = False

    def fill() -> None:  # called after the consumer has seen every report so far: it may decide what comes next
        nonlocal exhausted
        while len(loop.runs) < limit and not exhausted:
            nxt = next(pending, end)
            if nxt is end:
                exhausted = True
            elif nxt is None:  # nothing ready now (a search waiting on its probes): later
                return
            else:
                loop.add(nxt)

    fill()
    while loop.runs:
        loop.begin_step()
        reports, losses, loss = loop.measure()
        going, out, ended = [], [], []
        for run, report, s in zip(list(loop.runs), reports, losses):
            reason = loop.stop_reason(run, report)
            if reason is not None:
                ended.append((run, loop.finish(run, report, reason)))
            else:
                going.append((run, report, s))
        if going:
            loop.update([g[0] for g in going], [g[1] for g in going], [g[2] for g in going], loss)
        for run, report, _ in going:
            out.append((run.tag, report))
        for run, final in ended:
            final.adapter = stack.state(run.slot)  # its slot goes to the next run: the caller saves from this
            out.append((run.tag, final))
            loop.remove(run)
        yield from out
        if ended:
            fill()
        if not loop.runs and not exhausted:
            raise MemcoreError("train_many: no run is training and the next is not ready (runs gave None with "
                               "nothing in flight)")


def train_iter(model: Any, batch: Batch, spec: TrainSpec, *, pad_id: int = 0, base_loss: torch.Tensor | None = None,
               should_stop: Callable[[], bool] | None = None, use_prefix_cache: bool = True,
               resume: Checkpoint | None = None, checkpoint: Callable[[Checkpoint], None] | None = None,
               own_samples: int | None = None,
               init_adapter: dict[str, torch.Tensor] | None = None) -> Iterator[StepReport]:
    """Train one run's adapter (`model`: a memcore.stack.SlotModel, as attach_adapter and Base.adapted give) on
    `batch`, yielding a StepReport after every step and a final one: train_many with one run.

    The last report has final=True, the stop reason, and the greedy-generate check. `should_stop` is polled
    once per step (cooperative stop: the adapter trained so far is kept). `checkpoint` is called with the
    loop's whole state every `spec.checkpoint_every` seconds, and when a run stops before its end (stopped,
    time limit), after the reports of every earlier step were yielded; `resume` continues from such a
    state: the first report is then the one for the checkpoint's step, and the rest is what an uninterrupted
    run would have yielded. own_samples / init_adapter: a run trained after another (RunInput). Raises
    MemcoreError when `model` carries no adapter memcore attached, or when `resume` (or init_adapter) does not fit
    its adapter."""
    stack = getattr(model, "stack", None)
    if not isinstance(stack, AdapterStack):
        raise MemcoreError("train_iter needs an adapter memcore attached (memcore.placement.attach_adapter)")
    inp = RunInput(batch=batch, spec=spec, adapter=model.adapter_spec, base_loss=base_loss, resume=resume,
                   checkpoint=checkpoint, should_stop=should_stop, own_samples=own_samples, init_adapter=init_adapter)
    loop = _Loop(model.get_base_model(), stack, pad_id, use_prefix_cache)
    loop.add(inp, slot=0)  # the model's own adapter, as attached (or as an earlier call left it)
    try:
        while True:
            loop.begin_step()
            (report,), (losses,), loss = loop.measure()
            run = loop.runs[0]
            reason = loop.stop_reason(run, report)
            if reason is not None:
                yield loop.finish(run, report, reason)
                return
            loop.update([run], [report], [losses], loss)
            yield report
    finally:
        stack.set_rows([0])  # the model serves its one run again (generate, save) whatever the loop did


def train(model: Any, batch: Batch, spec: TrainSpec, **kwargs: Any) -> tuple[StepReport, list[StepReport]]:
    """Run train_iter to the end; return the final report and all reports."""
    reports = list(train_iter(model, batch, spec, **kwargs))
    return reports[-1], reports
