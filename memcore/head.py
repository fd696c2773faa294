"""The LM head at the target positions, in chunks: per-token loss, p(correct) and argmax without a [K, vocab] tensor.

A step needs, at each of the K kept positions, the cross-entropy of the target token, whether the argmax is
the target, and (for the update) the gradient of a weighted sum of those losses with respect to the hidden
state entering the head. The plain computation materialises the logits [K, V] in fp32, then log-softmax,
then its gradient, each as large again (at K = 2,048 and V = 49,152 each is 400 MB). Here the head runs on
chunks of rows and keeps only what is small:

- forward, per chunk of rows: logits [c, V] -> argmax, log-softmax, loss_i = -log p_target, and, for the rows
  that may carry weight in the update, the per-token gradient row d loss_i / d h_i = (softmax_i - onehot_i) W
  ([H] each, the standard softmax cross-entropy gradient). Only [K] losses and a [K, H] gradient survive.
- backward: d(sum_i g_i loss_i)/dh_i = g_i * (d loss_i / d h_i). Rows whose weight g_i is zero cost nothing
  (memft-ot late in a run trains few tokens). A row that gets weight without a precomputed gradient (the
  caller's hint was wrong, e.g. memft-ot's mean fallback) is recomputed, so the result never depends on the
  hint.

The same code serves training (grad on), tracking and the base-loss pass (grad off: no gradient rows).
It applies where the head is a plain ``nn.Linear`` whose weight is frozen and whose logits the model does
not transform afterwards; ``head_for`` checks this once per model numerically against the model's own
logits, and callers fall back to the plain computation otherwise.

Fused linear cross-entropy kernels (Liger on CUDA) were considered: they reduce the loss inside the kernel
with weights known before the forward, while memcore chooses each token's weight from that same forward's
losses and needs p and argmax per token (per-token weights are an open request there, linkedin/Liger-Kernel
#338), so this module is the path on every device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

CPU_CHUNK_BYTES = 48 * 2**20  # fp32 logits per chunk on CPU (512 rows at V = 49,152: big enough for full-speed matmuls)
CUDA_CHUNK_BYTES = 512 * 2**20  # on a GPU, fewer and larger matmuls

RowHint = Callable[[torch.Tensor], torch.Tensor]  # per-token loss [c] fp32 -> [c] bool: may this row train?

_verified: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk's fp32 logits [rows, vocab] take about CPU/CUDA_CHUNK_BYTES."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(8, budget // (4 * vocab))


def all_rows_at_once(device: torch.device) -> bool:
    """Whether gradient rows are computed for every target row, masked arithmetically (accelerators: no host
    sync), rather than only for the rows that may train, found by indexing (CPU: less work)."""
    return device.type != "cpu"


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss [N] fp32 (0 where not mask), correct [N] bool from h [N, H] through logits = h W^T + b."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                mask: torch.Tensor, hint: RowHint | None, rows: int,
                grad_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        loss = torch.zeros(n, dtype=torch.float32, device=h.device)
        correct = torch.zeros(n, dtype=torch.bool, device=h.device)
        want_grad = ctx.needs_input_grad[0] and grad_mode  # grad mode is always off in here: the caller's
        grad_rows = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device) if want_grad else None
        have = torch.zeros(n, dtype=torch.bool, device=h.device)
        # On CPU, skipping the gradient rows of tokens that cannot train saves real time and the boolean indexing
        # is free; on an accelerator every index lookup would wait for the device, while the extra rows cost
        # little, so all target rows get their gradient row and the backward never needs to recompute.
        dense = all_rows_at_once(h.device)
        ctx.complete = dense
        for s in range(0, n, rows):
            e = min(n, s + rows)
            logits = F.linear(h[s:e], weight, bias).float()  # [c, V]
            y = labels[s:e]
            correct[s:e] = logits.argmax(dim=-1) == y
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass; the logits are dropped next
            del logits
            li = -logp.gather(1, y[:, None])[:, 0]
            loss[s:e] = li
            if want_grad and not dense:
                need = mask[s:e] if hint is None else mask[s:e] & hint(li)
                idx = need.nonzero()[:, 0]
                if idx.numel():
                    _grad_into(grad_rows, have, s + idx, logp if idx.numel() == e - s else logp[idx], y[idx], weight)
            elif want_grad:  # every target row, masked arithmetically: no host sync to learn which rows
                grad_rows[s:e] = _grad_rows(logp, y, weight) * mask[s:e, None]
        loss = loss * mask
        correct = correct & mask
        ctx.mark_non_differentiable(correct)
        ctx.rows = rows
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), labels, mask, grad_rows, have)
        ctx.has_bias = bias is not None
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor) -> tuple:
        h, weight, bias, labels, mask, grad_rows, have = ctx.saved_tensors
        g = grad_loss.float() * mask
        missing = have[:0].long() if ctx.complete else ((g != 0) & ~have).nonzero()[:, 0]
        for s in range(0, missing.numel(), ctx.rows):  # rows the hint did not expect to train: recompute them
            idx = missing[s:s + ctx.rows]
            logp = torch.log_softmax(F.linear(h[idx], weight, bias if ctx.has_bias else None).float(), dim=-1)
            _grad_into(grad_rows, have, idx, logp, labels[idx], weight)
        grad_h = (g[:, None] * grad_rows).to(h.dtype)
        return grad_h, None, None, None, None, None, None, None


def _grad_rows(logp: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d loss_i / d h_i = (softmax_i - onehot(y_i)) @ weight, [c, H] fp32, from log-probabilities `logp` [c, V]
    (overwritten)."""
    p = logp.exp_()
    p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
    return (p.to(weight.dtype) @ weight).float()


def _grad_into(grad_rows: torch.Tensor, have: torch.Tensor, idx: torch.Tensor, logp: torch.Tensor,
               y: torch.Tensor, weight: torch.Tensor) -> None:
    """grad_rows[idx] = _grad_rows(logp, y, weight), and mark those rows as computed."""
    grad_rows[idx] = _grad_rows(logp, y, weight)
    have[idx] = True


def chunked_head_loss(h: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, mask: torch.Tensor,
                      hint: RowHint | None = None, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and argmax-correct through a linear head, in chunks of rows.

    Args:
        h: [N, H] hidden states entering the head (any float dtype; may require grad).
        head: the frozen ``nn.Linear`` LM head, weight [V, H].
        labels: [N] long target token ids.
        mask: [N] bool, which rows are targets (others get loss 0, correct False and no gradient).
        hint: optional, per-token loss [c] (nats) -> [c] bool, the rows that may carry weight in this step's
            update; their gradient rows are computed in the forward. Only an optimisation: a row outside
            the hint that does get weight is recomputed in the backward.
        rows: rows per chunk (default ``chunk_rows``).
    Returns:
        loss [N] fp32 in nats (differentiable with respect to h), correct [N] bool.
    """
    if rows is None:
        rows = chunk_rows(head.weight.shape[0], h.device)
    return _ChunkedHeadLoss.apply(h, head.weight, head.bias, labels, mask, hint, rows, torch.is_grad_enabled())


@contextmanager
def captured_head_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, `head` records its input and returns a [..., 1] zero tensor instead of the logits, so a
    model's forward runs its body only. Yields the list the inputs are appended to."""
    seen: list[torch.Tensor] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x.new_zeros(*x.shape[:-1], 1)

    head.forward = forward
    try:
        yield seen
    finally:
        del head.forward


def head_for(model: Any, forward: Callable[[int | None], Any]) -> torch.nn.Linear | None:
    """The model's LM head if the chunked path reproduces the model's own logits, else None.

    `forward(keep)` runs the model on the caller's inputs with ``logits_to_keep=keep`` and returns its output.
    The check runs once per head (cached): a plain ``nn.Linear`` with frozen weight and bias, not replaced by an
    accelerate hook, whose input through ``F.linear`` matches the logits the model returns at a few positions
    (this rejects models that scale or soft-cap logits after the head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    trained = head is not None and (head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad))
    if type(head) is not torch.nn.Linear or trained or "forward" in vars(head):
        return None
    ok = _verified.get(head)
    if ok is None:
        with torch.no_grad():
            ref = forward(4).logits[:, -4:, :].float()
            with captured_head_input(head) as seen:
                forward(4)
            mine = F.linear(seen[-1][:, -4:, :], head.weight, head.bias).float() if seen else None
        tol = 1e-3 if head.weight.dtype == torch.float32 else 5e-2
        ok = mine is not None and mine.shape == ref.shape and bool(
            torch.allclose(mine, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max()))))
        _verified[head] = ok
    return head if ok else None
