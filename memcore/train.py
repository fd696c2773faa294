"""The one streaming core: ``train_iter`` yields a StepReport per optimizer step; ``train`` consumes it.

Step k's report describes the adapter after k updates, measured (memcore.measure) by the very forward pass
that then computes step k+1's gradient, so tracking costs no extra forward. The loop has three parts: measure,
the stop policy, and the update (whose token weights memcore.objectives chooses). When the teacher-forced
argmax says "recalled", and at the end of every run, a real greedy decode confirms it, and a disagreement is
reported rather than hidden. Also here: the frozen-prefix cache, block recomputation, and checkpoints.
"""

from __future__ import annotations

import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from memcore import objectives as obj
from memcore.config import MemcoreError, TrainSpec
from memcore.data import Batch
from memcore.measure import StepReport, base_losses, compare, fill_report, greedy_generate, read_targets, token_losses
from memcore.placement import Placement, placement_of

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

    def capture(self, model: Any, batch: Batch) -> None:
        """Run the batch once and keep what block k-1 returns."""
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            if isinstance(out, tuple):
                self.output = tuple(o.detach() if torch.is_tensor(o) else o for o in out)
            else:
                self.output = out.detach()

        h = self.layers[self.k - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                token_losses(model, batch)
        finally:
            h.remove()

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


def _set_lora_dropout(model: Any, on: bool) -> None:
    for name, m in model.named_modules():
        if name.endswith(("lora_dropout", "bypass_dropout")) or ".lora_dropout." in name:
            m.train(on)


@dataclass
class Checkpoint:
    """Everything train_iter needs to continue a run exactly where it was: the adapter after `step` updates, the
    optimizer's moments, memft-sw's window, the RNG, and the clocks. Saved by the runner every few minutes."""

    step: int  # updates applied
    adapter: dict[str, torch.Tensor]  # trainable parameters by name, on the CPU
    optimizer: dict[str, Any]
    window: dict[str, Any]
    rng: torch.Tensor  # CPU generator state at the top of `step`, before its forward drew any dropout mask
    cuda_rng: list[torch.Tensor] | None
    elapsed: float  # seconds of training so far
    generate_seconds: float
    last_check_step: int
    notes: list[str] = field(default_factory=list)
    recent_delta_loss: list[float] = field(default_factory=list)  # ΔL of the latest steps, for until='converged'


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _capture(model: Any, opt: torch.optim.Optimizer, window: obj.SlidingWindow, step: int, rng: tuple, elapsed: float,
             gen_seconds: float, last_check_step: int, notes: list[str], recent: Iterable[float] = ()) -> Checkpoint:
    adapter = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    return Checkpoint(step=step, adapter=adapter, optimizer=opt.state_dict(), window=dict(vars(window)), rng=rng[0],
                      cuda_rng=rng[1], elapsed=elapsed, generate_seconds=gen_seconds, last_check_step=last_check_step,
                      notes=list(notes), recent_delta_loss=[float(x) for x in recent])


def _restore(model: Any, opt: torch.optim.Optimizer, window: obj.SlidingWindow, ckpt: Checkpoint) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in ckpt.adapter if n not in params]
    if missing or len(ckpt.adapter) != sum(p.requires_grad for p in params.values()):
        raise MemcoreError(f"the checkpoint does not fit this adapter ({len(missing)} unknown parameter(s), "
                           f"e.g. {missing[:1]})")
    with torch.no_grad():
        for n, v in ckpt.adapter.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
    opt.load_state_dict(ckpt.optimizer)
    for k, v in ckpt.window.items():
        setattr(window, "size" if k == "base" else k, v)  # "base": the width's name in older checkpoints
    torch.set_rng_state(ckpt.rng)
    if ckpt.cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt.cuda_rng)


PLATEAU_SMOOTH = 10  # ΔL is averaged over this many steps at each end of the plateau window (dropout makes it noisy)


def converged(report: StepReport, recent: deque[float], spec: TrainSpec) -> str | None:
    """Why a run has converged, or None: 'all_above_tau' when every target token has p > tau; 'plateau' when
    the mean ΔL of the last PLATEAU_SMOOTH steps exceeds that of the PLATEAU_SMOOTH steps plateau_window
    steps earlier by less than plateau_tol nats. `recent` holds the latest ΔL values (this step's last)."""
    if report.n_above == report.n_tokens:
        return "all_above_tau"
    if len(recent) < spec.plateau_window + PLATEAU_SMOOTH:
        return None
    values = list(recent)
    gain = sum(values[-PLATEAU_SMOOTH:]) / PLATEAU_SMOOTH - sum(values[:PLATEAU_SMOOTH]) / PLATEAU_SMOOTH
    return "plateau" if gain < spec.plateau_tol else None


class _Loop:
    """The state of one training loop and its three parts, each readable on its own:

    - ``measure``: the forward pass at the current adapter -> a StepReport (how a step is measured);
    - ``stop_reason`` / ``finish``: the stop policy, and the final report's clean re-measure and generate check;
    - ``update``: the method's token weights (memcore.objectives.token_weights) -> one optimizer step."""

    def __init__(self, model: Any, batch: Batch, spec: TrainSpec, pad_id: int, base_loss: torch.Tensor | None,
                 use_prefix_cache: bool, resume: Checkpoint | None, checkpoint: Callable[[Checkpoint], None] | None):
        model.eval()
        self.model, self.batch, self.spec, self.pad_id, self.checkpoint = model, batch, spec, pad_id, checkpoint
        self.dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for n, m in model.named_modules()
                           if "lora_dropout" in n or "bypass_dropout" in n)
        self.prefix = FrozenPrefix.maybe(model) if use_prefix_cache else None
        if self.prefix is not None:
            self.prefix.capture(model, batch)
        if base_loss is None:
            base_loss = base_losses(model, batch)
        self.where = batch.target_mask.flatten().nonzero()[:, 0]  # flat target positions, row-major: sample 0's, ...
        self.base_np = read_targets(base_loss, batch.target_mask, self.where)[0]  # [N] base loss per target, nats
        self.may_train = obj.may_train(spec.method, spec.tau)
        self.prev_loss = base_loss  # [B, K] the latest per-token loss (nats), to guess which tokens train next
        self.recompute = use_recompute(model, batch, spec.recompute, self.prefix.k if self.prefix is not None else 0)
        params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW on accelerators: one kernel for all adapter tensors, no per-tensor launches
        self.opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                     fused=bool(params) and params[0].device.type == "cuda")
        self.window = obj.SlidingWindow(size=spec.window)
        torch.manual_seed(spec.seed)
        self.step, self.last_check_step, self.gen_seconds, self.notes, elapsed0 = 0, -10**9, [0.0], [], 0.0
        if resume is not None:
            _restore(model, self.opt, self.window, resume)
            self.step, self.last_check_step, elapsed0 = resume.step, resume.last_check_step, resume.elapsed
            self.gen_seconds, self.notes = [resume.generate_seconds], list(resume.notes)
        self.t0 = time.perf_counter() - elapsed0
        self.last_saved = time.perf_counter()
        self.first_step = self.step
        # (loss, correct) [B, K] of the last forward, kept while the adapter and its dropout masks stay as they were
        # (a skipped update without dropout): the next measure reuses it; None means run the forward
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        # the latest steps' ΔL (nats), for until='converged'
        self.recent: deque[float] = deque(resume.recent_delta_loss if resume is not None else (),
                                          maxlen=spec.plateau_window + PLATEAU_SMOOTH)
        self.measured = -1  # the last step whose ΔL is in `recent`
        self.rng: tuple | None = None  # RNG state at the top of the current step, for a checkpoint

    # -- checkpoints --

    def save(self) -> None:
        """Hand the loop's whole state to `checkpoint` (continuing from it reproduces the rest of the run)."""
        if self.checkpoint is not None:
            # the checkpoint restarts at `step`, whose ΔL is appended again on resume: keep only the steps before it
            recent = list(self.recent)[:-1] if self.measured == self.step else list(self.recent)
            self.checkpoint(_capture(self.model, self.opt, self.window, self.step, self.rng,
                                     time.perf_counter() - self.t0, self.gen_seconds[0], self.last_check_step,
                                     self.notes, recent))
        self.last_saved = time.perf_counter()

    def begin_step(self) -> None:
        """Record the RNG state the step starts from, and save a checkpoint when one is due."""
        self.rng = _rng_state() if self.checkpoint is not None else None
        if (self.checkpoint is not None and self.spec.checkpoint_every and self.step > self.first_step
                and time.perf_counter() - self.last_saved >= self.spec.checkpoint_every):
            self.save()

    # -- how a step is measured --

    def measure(self) -> tuple[StepReport, obj.StepLosses, torch.Tensor]:
        """The forward pass at the current adapter (dropout on when the adapter has it, reused when nothing
        changed since the last one) -> the step's report; what the weighting rule reads (detached losses,
        argmax-correct, their host copy); and the per-token loss [B, K] (nats, with grad) the update
        backpropagates. One device-to-host copy."""
        _set_lora_dropout(self.model, self.dropout)
        if self.last is None:
            k = self.prefix.k if self.prefix is not None else 0
            with (self.prefix.installed() if self.prefix is not None else nullcontext(),
                  recomputed(self.model, k) if self.recompute else nullcontext()):
                expect = None if self.may_train is None else self.may_train(self.prev_loss)
                self.last = token_losses(self.model, self.batch, expect)
                self.prev_loss = self.last[0].detach()
        loss, correct = self.last
        fl, fc = read_targets(loss.detach(), correct, self.where)
        report = StepReport(step=self.step, loss=0.0, delta_loss=0.0, p=fl, correct=fc, n_above=0, n_correct=0,
                            active=0, recalled=False, first_divergence=None, elapsed=time.perf_counter() - self.t0,
                            lr=self.spec.lr * max(0.0, 1.0 - self.step / self.spec.max_steps), bits_stored=0.0,
                            notes=self.notes)
        fill_report(report, fl, fc, self.base_np, self.spec.tau)
        self.recent.append(report.delta_loss)
        self.measured = self.step
        losses = obj.StepLosses(loss=loss.detach(), correct=correct, mask=self.batch.target_mask, host_loss=fl,
                                step=self.step)
        return report, losses, loss

    # -- the stop policy --

    def stop_reason(self, report: StepReport, should_stop: Callable[[], bool] | None) -> str | None:
        """Why the run ends at this step, or None to train on. In order: asked to stop, time limit, step
        budget, converged (when until='converged'), recalled (when stop_when_recalled, confirmed by a
        greedy generate at most every 5 steps)."""
        spec, step = self.spec, self.step
        if should_stop is not None and should_stop():
            return "stopped"
        if spec.max_seconds is not None and report.elapsed >= spec.max_seconds:
            return "max_seconds"
        if step >= spec.max_steps:
            return "max_steps"
        reason = converged(report, self.recent, spec) if spec.until == "converged" else None
        if reason is not None:
            if reason == "all_above_tau" and self.dropout and not _all_above_without_dropout(
                    self.model, self.batch, self.where, spec.tau):
                return None  # only dropout's noise put every token above tau: train on
            return reason
        if report.recalled and spec.stop_when_recalled and step - self.last_check_step >= 5:
            self.last_check_step = step
            gen = _generate_check(self.model, self.batch, self.pad_id, report, self.gen_seconds)
            if report.generate_recalled:
                report.generated = gen
                return "recalled"
            self.notes.append(f"step {step}: teacher-forced argmax says recalled but greedy generate differs "
                              f"at token {report.generate_divergence}; training on")
        return None

    def finish(self, report: StepReport, reason: str) -> StepReport:
        """Turn the step's report into the final one: checkpoint an unfinished run, re-measure without
        dropout, run the greedy-generate check (when spec.verify) and note any disagreement with it."""
        if reason in ("stopped", "max_seconds"):  # unfinished: keep what continuing would need
            self.save()
        if self.dropout:  # the training forward had dropout on: measure the final adapter without it
            _set_lora_dropout(self.model, False)
            with torch.no_grad():
                loss, correct = token_losses(self.model, self.batch)
            fill_report(report, *read_targets(loss, correct, self.where), self.base_np, self.spec.tau)
        if report.generated is None and self.spec.verify:
            report.generated = _generate_check(self.model, self.batch, self.pad_id, report, self.gen_seconds)
        if report.generate_recalled is not None and report.recalled != report.generate_recalled:
            report.notes.append("teacher-forced recall and greedy generate disagree "
                                f"(argmax: {report.recalled}, generate: {report.generate_recalled})")
        report.final, report.stop_reason = True, reason
        report.elapsed = time.perf_counter() - self.t0
        report.generate_seconds = self.gen_seconds[0]
        return report

    # -- the update --

    def update(self, report: StepReport, losses: obj.StepLosses, loss: torch.Tensor) -> None:
        """One optimizer step on the weighted mean of `loss` [B, K], the weights chosen by the method's rule
        from `losses`; skipped (report.skipped) when no token carries weight. Sets report.active."""
        w, report.active = obj.token_weights(self.spec, losses, self.window)
        if report.active == 0:  # nothing left to learn: skip backward and the optimizer step entirely
            report.skipped = True
            if self.dropout:  # with dropout the next forward differs anyway
                self.last = None
        else:
            for group in self.opt.param_groups:  # linear decay to 0 over the budget, no warmup
                group["lr"] = report.lr
            self.opt.zero_grad(set_to_none=True)
            obj.weighted_mean(loss, w).backward()
            self.opt.step()
            self.last = None
        self.step += 1


def train_iter(model: Any, batch: Batch, spec: TrainSpec, *, pad_id: int = 0, base_loss: torch.Tensor | None = None,
               should_stop: Callable[[], bool] | None = None, use_prefix_cache: bool = True,
               resume: Checkpoint | None = None,
               checkpoint: Callable[[Checkpoint], None] | None = None) -> Iterator[StepReport]:
    """Train the adapter of `model` on `batch`, yielding a StepReport after every step and a final one.

    The last report has final=True, the stop reason, and the greedy-generate check. `should_stop` is polled
    once per step (cooperative stop: the adapter trained so far is kept). `checkpoint` is called with the
    loop's whole state every `spec.checkpoint_every` seconds, and when a run stops before its end (stopped,
    time limit), after the reports of every earlier step were yielded; `resume` continues from such a
    state: the first report is then the one for the checkpoint's step, and the rest is what an uninterrupted
    run would have yielded. Raises MemcoreError when `resume` does not fit the model's adapter."""
    loop = _Loop(model, batch, spec, pad_id, base_loss, use_prefix_cache, resume, checkpoint)
    while True:
        loop.begin_step()
        report, losses, loss = loop.measure()
        reason = loop.stop_reason(report, should_stop)
        if reason is not None:
            yield loop.finish(report, reason)
            return
        loop.update(report, losses, loss)
        yield report


@torch.no_grad()
def _all_above_without_dropout(model: Any, batch: Batch, where: torch.Tensor, tau: float) -> bool:
    _set_lora_dropout(model, False)
    try:
        loss, _ = token_losses(model, batch)
    finally:
        _set_lora_dropout(model, True)
    return bool((loss.flatten()[where] < obj.cut(tau)).all())


def _generate_check(model: Any, batch: Batch, pad_id: int, report: StepReport, seconds: list[float]) -> list[list[int]]:
    _set_lora_dropout(model, False)
    t = time.perf_counter()
    gen = greedy_generate(model, batch.samples, pad_id)
    seconds[0] += time.perf_counter() - t
    report.generate_divergence = compare(gen, batch.samples)
    report.generate_recalled = report.generate_divergence is None
    return gen


def train(model: Any, batch: Batch, spec: TrainSpec, **kwargs: Any) -> tuple[StepReport, list[StepReport]]:
    """Run train_iter to the end; return the final report and all reports."""
    reports = list(train_iter(model, batch, spec, **kwargs))
    return reports[-1], reports
