"""The one streaming core: ``train_iter`` yields a StepReport per optimizer step; ``train`` consumes it.

Step k's report describes the adapter after k updates, measured by the very forward pass that then
computes step k+1's gradient, so tracking costs no extra forward. Exact greedy recall is read from the
teacher-forced argmax (if every target position's argmax is the target, greedy decoding reproduces the
whole target by induction); when that says "recalled", and at the end of every run, a real greedy
``generate`` confirms it, and a disagreement is reported rather than hidden.
"""

from __future__ import annotations

import math
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memcore import objectives as obj
from memcore.config import MemcoreError, TrainSpec
from memcore.data import Batch, Sample
from memcore.head import RowHint, captured_head_input, chunked_head_loss, head_for
from memcore.placement import Placement, placement_of

LN2 = math.log(2.0)


@dataclass
class StepReport:
    step: int  # optimizer updates applied so far
    loss: float  # mean cross-entropy over target tokens, adapter on
    delta_loss: float  # mean base loss (adapter off) minus `loss`
    p: np.ndarray  # [N] float16, probability of the correct token at each target position
    correct: np.ndarray  # [N] bool, teacher-forced argmax == target
    n_above: int  # tokens with p > tau
    n_correct: int  # tokens whose argmax is right
    active: int  # tokens carrying weight in the update taken from this state (0 when skipped or final)
    recalled: bool  # every argmax right: greedy decoding reproduces the target
    first_divergence: int | None  # first wrong position, where greedy decoding goes astray
    elapsed: float  # seconds since training started
    lr: float
    skipped: bool = False  # memft-ot with nothing below tau: no update taken
    final: bool = False
    stop_reason: str | None = None  # recalled | all_above_tau | plateau | max_steps | max_seconds | stopped
    bits_stored: float = 0.0  # sum(base_loss - loss) / ln 2
    generated: list[list[int]] | None = None  # final: greedy continuation of each prompt
    generate_recalled: bool | None = None  # final (or recall check): did generate reproduce every target?
    generate_divergence: int | None = None
    generate_seconds: float = 0.0  # time spent in greedy-generate checks so far (part of elapsed)
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None  # set by the runner once the report is stored
    summary: dict | None = None  # final report of a stored run: the run summary

    @property
    def n_tokens(self) -> int:
        return int(self.p.shape[0])


# --- forward pieces ----------------------------------------------------------------------------------------


def token_losses(model: Any, batch: Batch, hint: RowHint | None = None,
                 chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, K] (fp32, nats; 0 off the target mask) and argmax-correct [B, K] (bool)
    at the target positions only.

    Through ``memcore.head`` where the model's head allows it (no [B, K, vocab] tensor; `hint` names the
    rows that may train this step, see ``chunked_head_loss``), else from the model's own logits."""
    def forward(keep: int | None) -> Any:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     logits_to_keep=keep, use_cache=False)

    head = head_for(model, lambda keep: forward(min(keep, batch.keep))) if chunked else None
    if head is not None:
        with captured_head_input(head) as seen:
            forward(batch.keep)
        h = seen[-1][:, -batch.keep:, :]  # [B, K, H]
        loss, correct = chunked_head_loss(h.reshape(-1, h.shape[-1]), head, batch.labels.reshape(-1),
                                          batch.target_mask.reshape(-1), hint)
        return loss.view(batch.labels.shape), correct.view(batch.labels.shape)
    logits = forward(batch.keep).logits[:, -batch.keep:, :].float()  # [B, K, V]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), reduction="none")
    loss = loss.view(batch.labels.shape) * batch.target_mask
    correct = (logits.detach().argmax(-1) == batch.labels) & batch.target_mask
    return loss, correct


@torch.no_grad()
def base_losses(model: Any, batch: Batch) -> torch.Tensor:
    """Per-token loss of the base model (adapter switched off), [B, K]."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with ctx:
        loss, _ = token_losses(model, batch)
    return loss


@torch.no_grad()
def greedy_generate(model: Any, samples: list[Sample], pad_id: int = 0, max_new: int | None = None) -> list[list[int]]:
    """Greedy continuation of each sample's prompt: as many tokens as its target (or max_new), argmax at every
    position, reusing the KV cache.

    A plain argmax loop rather than ``generate``: nothing may end it early (an EOS that is really a target
    token, say, or a model's generation config asking for EOS stops, repetition penalties or a minimum
    length), so it is exactly the decoding that the teacher-forced argmax predicts. pad_id is unused (kept
    for callers that pass it)."""
    outs = []
    device = _device(model)
    cache_arg = _cache_argument(model)
    for s in samples:
        n = max_new or len(s.target_ids)
        ids = torch.tensor([s.prompt_ids], device=device)
        out = model(input_ids=ids, use_cache=True)
        gen: list[torch.Tensor] = []
        for k in range(n):
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)  # [1, 1]
            gen.append(nxt)
            if k + 1 < n:
                cache = out.cache if cache_arg == "cache" else out.past_key_values
                out = model(input_ids=nxt, use_cache=True, **{cache_arg: cache})
        outs.append(torch.cat(gen, dim=1)[0].tolist())
    return outs


def _cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: 'cache' in newer transformers, 'past_key_values' before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def compare(generated: list[list[int]], samples: list[Sample]) -> int | None:
    """Flat index of the first generated token that differs from the target (None if all match)."""
    offset = 0
    for g, s in zip(generated, samples):
        for i, t in enumerate(s.target_ids):
            if i >= len(g) or g[i] != t:
                return offset + i
        offset += len(s.target_ids)
    return None


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


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
        placement = placement_of(model)
        k = placement.lowest_adapted
        if k is None or k < 1 or placement.trainable_below_blocks:
            return None
        return cls(placement, k)

    def capture(self, model: Any, batch: Batch) -> None:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            self.output = tuple(o.detach() if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) else out.detach()

        h = self.layers[self.k - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                token_losses(model, batch)
        finally:
            h.remove()

    @contextmanager
    def active(self) -> Iterator[None]:
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


ACTIVATION_FLOATS_PER_TOKEN = 24  # saved activations per token per block, in units of hidden_size (measured, Llama-style)
RECOMPUTE_ABOVE_BYTES = 768 * 2**20  # 'auto' recomputes when the blocks' saved activations would exceed this


def use_recompute(model: Any, batch: Batch, setting: str, start: int) -> bool:
    """Whether to recompute blocks `start`.. in the backward: 'on', 'off', or 'auto' (when their saved
    activations, estimated as tokens x blocks x 24 x hidden x element size in bytes, exceed
    RECOMPUTE_ABOVE_BYTES: at the `paper` placement on the default model, from about 1,400 tokens).
    Recomputing costs about one more forward of those blocks (+20% step time at 2,048 tokens here) and
    saves most of their activation memory (2,048 tokens: peak RSS 2.2 -> 1.5 GB)."""
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
        raise MemcoreError(f"the checkpoint does not fit this adapter ({len(missing)} unknown parameter(s), e.g. {missing[:1]})")
    with torch.no_grad():
        for n, v in ckpt.adapter.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
    opt.load_state_dict(ckpt.optimizer)
    for k, v in ckpt.window.items():
        setattr(window, k, v)
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


def train_iter(model: Any, batch: Batch, spec: TrainSpec, *, pad_id: int = 0, base_loss: torch.Tensor | None = None,
               should_stop: Callable[[], bool] | None = None, use_prefix_cache: bool = True,
               resume: Checkpoint | None = None, checkpoint: Callable[[Checkpoint], None] | None = None) -> Iterator[StepReport]:
    """Train the adapter of `model` on `batch`, yielding a StepReport after every step and a final one.

    The last report has final=True, the stop reason, and the greedy-generate check. `should_stop` is polled
    once per step (cooperative stop: the adapter trained so far is kept). `checkpoint` is called with the
    loop's whole state every `spec.checkpoint_every` seconds, and when a run stops before its end (stopped,
    time limit), after the reports of every earlier step were yielded; `resume` continues from such a
    state: the first report is then the one for the checkpoint's step, and the rest is what an uninterrupted
    run would have yielded."""
    model.eval()
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for n, m in model.named_modules()
                  if "lora_dropout" in n or "bypass_dropout" in n)
    prefix = FrozenPrefix.maybe(model) if use_prefix_cache else None
    if prefix is not None:
        prefix.capture(model, batch)
    if base_loss is None:
        base_loss = base_losses(model, batch)
    mask = batch.target_mask
    where = mask.flatten().nonzero()[:, 0]  # flat positions of the targets, row-major: sample 0's, then 1's, ...
    base_np = _read(base_loss, mask, where)[0]
    n_rows = batch.input_ids.shape[0]

    hint = obj.may_train(spec.method, spec.tau)
    recompute = use_recompute(model, batch, spec.recompute, prefix.k if prefix is not None else 0)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on accelerators: one kernel for all adapter tensors, no per-tensor launches
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay,
                            fused=bool(params) and params[0].device.type == "cuda")
    window = obj.SlidingWindow(base=spec.window)
    torch.manual_seed(spec.seed)
    step, last_check_step, gen_seconds, notes, elapsed0 = 0, -10**9, [0.0], [], 0.0
    if resume is not None:
        _restore(model, opt, window, resume)
        step, last_check_step, gen_seconds, notes, elapsed0 = (resume.step, resume.last_check_step, [resume.generate_seconds],
                                                               list(resume.notes), resume.elapsed)

    t0 = time.perf_counter() - elapsed0
    last_saved = time.perf_counter()
    first_step = step
    changed = True  # params changed since the last forward (else its result can be reused)
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    plateau: deque[float] = deque(resume.recent_delta_loss if resume is not None else (),  # recent ΔL, for until='converged'
                                  maxlen=spec.plateau_window + PLATEAU_SMOOTH)
    measured = -1  # the last step whose ΔL is in `plateau`

    def save() -> None:
        nonlocal last_saved
        if checkpoint is not None:
            # the checkpoint restarts at `step`, whose ΔL is appended again on resume: keep only the steps before it
            recent = list(plateau)[:-1] if measured == step else list(plateau)
            checkpoint(_capture(model, opt, window, step, rng, time.perf_counter() - t0, gen_seconds[0], last_check_step, notes,
                                recent))
        last_saved = time.perf_counter()

    while True:
        rng = _rng_state() if checkpoint is not None else None
        if (checkpoint is not None and spec.checkpoint_every and step > first_step
                and time.perf_counter() - last_saved >= spec.checkpoint_every):
            save()
        _set_lora_dropout(model, dropout)
        if changed or last is None:
            with (prefix.active() if prefix is not None else nullcontext(),
                  recomputed(model, prefix.k if prefix is not None else 0) if recompute else nullcontext()):
                loss, correct = token_losses(model, batch, hint)
            last = (loss, correct)
        loss, correct = last
        det = loss.detach()
        fl, fc = _read(det, correct, where)  # the step's one device-to-host copy
        report = StepReport(step=step, loss=0.0, delta_loss=0.0, p=fl, correct=fc, n_above=0, n_correct=0, active=0,
                            recalled=False, first_divergence=None, elapsed=time.perf_counter() - t0,
                            lr=spec.lr * max(0.0, 1.0 - step / spec.max_steps), bits_stored=0.0, notes=notes)
        _fill(report, fl, fc, base_np, spec.tau)
        recalled = report.recalled
        plateau.append(report.delta_loss)
        measured = step

        reason = None
        if should_stop is not None and should_stop():
            reason = "stopped"
        elif spec.max_seconds is not None and report.elapsed >= spec.max_seconds:
            reason = "max_seconds"
        elif step >= spec.max_steps:
            reason = "max_steps"
        elif spec.until == "converged" and (reason := converged(report, plateau, spec)) is not None:
            if reason == "all_above_tau" and dropout and not _all_above_without_dropout(model, batch, where, spec.tau):
                reason = None  # only dropout's noise put every token above tau: train on
        elif recalled and spec.stop_when_recalled and step - last_check_step >= 5:
            last_check_step = step
            gen = _check(model, batch, pad_id, report, gen_seconds)
            if report.generate_recalled:
                reason = "recalled"
                report.generated = gen
            else:
                notes.append(f"step {step}: teacher-forced argmax says recalled but greedy generate differs "
                             f"at token {report.generate_divergence}; training on")
        if reason is not None:
            if reason in ("stopped", "max_seconds"):  # unfinished: keep what continuing would need
                save()
            if dropout:  # the training forward had dropout on: measure the final adapter without it
                _set_lora_dropout(model, False)
                with torch.no_grad():
                    loss, correct = token_losses(model, batch)
                _fill(report, *_read(loss, correct, where), base_np, spec.tau)
            if report.generated is None and spec.verify:
                report.generated = _check(model, batch, pad_id, report, gen_seconds)
            if report.generate_recalled is not None and report.recalled != report.generate_recalled:
                report.notes.append("teacher-forced recall and greedy generate disagree "
                                    f"(argmax: {report.recalled}, generate: {report.generate_recalled})")
            report.final, report.stop_reason = True, reason
            report.elapsed = time.perf_counter() - t0
            report.generate_seconds = gen_seconds[0]
            yield report
            return

        # choose this step's token weights from the detached losses
        rows = obj.curriculum_rows(step, spec.max_steps, n_rows, spec.curriculum_stages) if spec.method == "memft-sw" else None
        # (sft and memft-ot count their active tokens on the host copy of the very losses the weights come from:
        # no further device sync; memft-sw's window reads its anchors and counts on the device)
        if spec.method == "sft":
            w, report.active = obj.sft_weights(det, mask), report.n_tokens
        elif spec.method == "memft-ot":
            w, report.active = obj.ot_weights(det, mask, spec.tau), int((fl > obj.cut(spec.tau)).sum())
            if report.active == 0 and spec.ot_when_empty == "mean":
                w, report.active = obj.sft_weights(det, mask), report.n_tokens
        else:
            w = obj.sw_weights(det, correct, mask, spec.tau, window)
            if rows is not None and len(rows) < n_rows:
                w = w * (torch.arange(n_rows, device=w.device) < len(rows)).to(w.dtype)[:, None]
            report.active = int((w > 0).sum())
        if report.active == 0:  # nothing left to learn: skip backward and the optimizer step entirely
            report.skipped = True
            changed = dropout
        else:
            for group in opt.param_groups:  # linear decay to 0 over the budget, no warmup
                group["lr"] = report.lr
            opt.zero_grad(set_to_none=True)
            obj.weighted_mean(loss, w).backward()
            opt.step()
            changed = True
        last = None if changed else last
        yield report
        step += 1


@torch.no_grad()
def _all_above_without_dropout(model: Any, batch: Batch, where: torch.Tensor, tau: float) -> bool:
    _set_lora_dropout(model, False)
    try:
        loss, _ = token_losses(model, batch)
    finally:
        _set_lora_dropout(model, True)
    return bool((loss.flatten()[where] < obj.cut(tau)).all())


def _read(loss: torch.Tensor, correct: torch.Tensor, where: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-target loss [N] float32 (nats) and argmax-correct [N] bool on the host, in one device-to-host copy."""
    packed = torch.cat([loss.detach().flatten()[where].float(), correct.flatten()[where].float()]).cpu().numpy()
    n = where.numel()
    return packed[:n], packed[n:] > 0.5


def _fill(report: StepReport, fl: np.ndarray, fc: np.ndarray, base_np: np.ndarray, tau: float) -> None:
    """Set a report's measurements from the host copies: losses `fl` [N] (nats), argmax-correct `fc` [N]."""
    report.loss = float(fl.mean())
    report.delta_loss = float(base_np.mean()) - report.loss
    report.p = np.exp(-fl).astype(np.float16)
    report.correct = fc
    report.n_above = int((fl < obj.cut(tau)).sum())
    report.n_correct = int(fc.sum())
    report.recalled = bool(fc.all())
    report.first_divergence = None if report.recalled else int(np.argmin(fc))
    report.bits_stored = float((base_np.astype(np.float64) - fl).sum()) / LN2


def _check(model: Any, batch: Batch, pad_id: int, report: StepReport, seconds: list[float]) -> list[list[int]]:
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
