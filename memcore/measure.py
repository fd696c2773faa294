"""How a step is measured: the forward pass at the target positions and what is read from it.

``token_losses`` gives per-token cross-entropy (nats) and argmax-correct at the target positions, through
``memcore.head``'s chunked LM head where the model allows it; ``read_targets`` brings them to the host in one
device-to-host copy; ``fill_report`` turns them into a StepReport's numbers (mean loss, ΔL against the base,
p per token, tokens above τ, argmax-correct, recall, first divergence, bits stored). Exact greedy recall is
read from the teacher-forced argmax (if every target position's argmax is the target, greedy decoding
reproduces the whole target by induction); ``greedy_generate`` and ``compare`` confirm it with real decoding.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memcore import objectives as obj
from memcore.data import Batch, Sample
from memcore.head import captured_head_input, chunked_head_loss, head_for

LN2 = math.log(2.0)


@dataclass
class StepReport:
    """What one step measured (the adapter after `step` updates); the final report adds the stop reason,
    the greedy-generate check and, from the runner, the run's summary."""
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
    summary: Any = None  # final report of a stored run: its memcore.records.RunSummary
    adapter: dict[str, Any] | None = None  # final report from train_many: the run's adapter (AdapterStack.state)
    batch_rows: list[int] | None = None  # minibatches: the samples this step measured afresh and trains (data order)
    epoch: int | None = None  # minibatches: the epoch this step belongs to (from 0)
    # a run trained after another (TrainSpec.after): the earlier runs' targets, measured beside its own (the fields
    # above cover its own targets only); None on a run without earlier targets
    earlier_p: np.ndarray | None = None  # [M] float16, p of the correct token at each earlier target position
    earlier_correct: np.ndarray | None = None  # [M] bool, teacher-forced argmax == earlier target
    earlier_above: int | None = None  # earlier tokens with p > tau
    earlier_recalled: bool | None = None  # every earlier argmax right
    earlier_prefix: int | None = None  # earlier tokens before the first wrong argmax, in order (M when recalled)
    rehearsal: float | None = None  # share of this step's update weight on earlier targets (0 without --keep)

    @property
    def n_tokens(self) -> int:
        """N: target tokens in the batch."""
        return int(self.p.shape[0])


NO_GRAD_TOKENS = 4096  # a measuring forward (no gradient) of more input tokens than this runs in row chunks


def rows_of_batch(batch: Batch, rows: slice) -> Batch:
    """Some rows of a batch (same columns)."""
    return Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], batch.labels[rows],
                 batch.target_mask[rows], batch.samples[rows])


def token_losses(model: Any, batch: Batch, train_rows: torch.Tensor | None = None,
                 chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, K] (fp32, nats; 0 off the target mask) and argmax-correct [B, K] (bool)
    at the target positions only. Without gradient (measuring), a batch of more than NO_GRAD_TOKENS input tokens
    runs a few rows at a time, so measuring a 1,000-entry PhoneBook holds one chunk's activations, not all of them.

    Through ``memcore.head`` where the model's head allows it (no [B, K, vocab] tensor; `train_rows` [B, K]
    bool names the tokens expected to carry weight in this step's update, see ``chunked_head_loss``), else
    from the model's own logits."""
    if not torch.is_grad_enabled() and batch.input_ids.shape[0] > 1 and batch.input_ids.numel() > NO_GRAD_TOKENS:
        rows = max(1, NO_GRAD_TOKENS // batch.input_ids.shape[1])  # many samples measured: a few rows at a time
        parts = [token_losses(model, rows_of_batch(batch, slice(i, i + rows)), None, chunked)
                 for i in range(0, batch.input_ids.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward(keep: int | None) -> Any:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     logits_to_keep=keep, use_cache=False)

    head = head_for(model, lambda keep: forward(min(keep, batch.keep))) if chunked else None
    if head is not None:
        with captured_head_input(head) as seen:
            forward(batch.keep)
        h = seen[-1][:, -batch.keep:, :]  # [B, K, H]
        loss, correct = chunked_head_loss(h.reshape(-1, h.shape[-1]), head, batch.labels.reshape(-1),
                                          batch.target_mask.reshape(-1),
                                          None if train_rows is None else train_rows.reshape(-1))
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


DECODE_ROWS = 64  # samples decoded together by greedy_generate (bounds the KV cache: rows x length x layers)


@torch.no_grad()
def greedy_generate(model: Any, samples: list[Sample], pad_id: int = 0, max_new: int | None = None) -> list[list[int]]:
    """Greedy continuation of each sample's prompt: as many tokens as its target (or max_new), argmax at every
    position, reusing the KV cache. Returns one list of token ids per sample, in order.

    Many samples (a PhoneBook) decode DECODE_ROWS at a time as one left-padded batch (attention mask and position
    ids make each row's numbers its own, to float tolerance), grouped by prompt length so padding stays small: a
    1,000-entry book is 16 batched decodes, not 1,000 single ones. A plain argmax loop rather than ``generate``:
    nothing may end it early (an EOS that is really a target token, say, or a model's generation config asking
    for EOS stops, repetition penalties or a minimum length), so it is exactly the decoding that the
    teacher-forced argmax predicts. pad_id fills the padding (never attended to)."""
    outs: list[list[int] | None] = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt_ids))
    for at in range(0, len(order), DECODE_ROWS):
        group = order[at:at + DECODE_ROWS]
        got = _decode_group(model, [samples[i] for i in group], pad_id, max_new)
        for i, g in zip(group, got):
            outs[i] = g
    return [o or [] for o in outs]


def _decode_group(model: Any, samples: list[Sample], pad_id: int, max_new: int | None) -> list[list[int]]:
    """Greedy decode of a few samples as one left-padded batch: [B] lists of their targets' lengths (or max_new)."""
    device = _device(model)
    cache_arg = _cache_argument(model)
    lengths = [max_new or len(s.target_ids) for s in samples]
    n = max(lengths)
    B, T = len(samples), max(len(s.prompt_ids) for s in samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((B, T), dtype=torch.long, device=device)
    for i, s in enumerate(samples):
        ids[i, T - len(s.prompt_ids):] = torch.tensor(s.prompt_ids, device=device)
        attention[i, T - len(s.prompt_ids):] = 1
    padded = bool((attention == 0).any())
    extra = (lambda a: {"attention_mask": a, "position_ids": (a.cumsum(-1) - 1).clamp(min=0)}) if padded else \
        (lambda a: {})
    out = model(input_ids=ids, use_cache=True, **extra(attention))
    gen: list[torch.Tensor] = []
    for k in range(n):
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)  # [B, 1]
        gen.append(nxt)
        if k + 1 < n:
            cache = out.cache if cache_arg == "cache" else out.past_key_values
            attention = torch.cat([attention, attention.new_ones((B, 1))], dim=1)
            step = extra(attention)
            if padded:
                step["position_ids"] = step["position_ids"][:, -1:]
            out = model(input_ids=nxt, use_cache=True, **step, **{cache_arg: cache})
    tokens = torch.cat(gen, dim=1).tolist()  # [B, n]
    return [row[:m] for row, m in zip(tokens, lengths)]


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


def read_targets(loss: torch.Tensor, correct: torch.Tensor, where: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-target loss [N] float32 (nats) and argmax-correct [N] bool on the host, in one device-to-host copy."""
    packed = torch.cat([loss.detach().flatten()[where].float(), correct.flatten()[where].float()]).cpu().numpy()
    n = where.numel()
    return packed[:n], packed[n:] > 0.5


def fill_earlier(report: StepReport, fl: np.ndarray, fc: np.ndarray, tau: float) -> None:
    """Set a report's measurements of the earlier runs' targets: losses `fl` [M] (nats), argmax-correct `fc` [M]."""
    report.earlier_p = np.exp(-fl).astype(np.float16)
    report.earlier_correct = fc
    report.earlier_above = int((fl < obj.cut(tau)).sum())
    report.earlier_recalled = bool(fc.all())
    report.earlier_prefix = len(fc) if report.earlier_recalled else int(np.argmin(fc))


def fill_report(report: StepReport, fl: np.ndarray, fc: np.ndarray, base_np: np.ndarray, tau: float) -> None:
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
