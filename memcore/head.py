"""The LM head at the target positions, in tiles: per-token loss, p(correct) and argmax without a [K, vocab] tensor.

A step needs, at each of the K kept positions, the cross-entropy of the target token, whether the argmax is
the target, and (for the update) the gradient of a weighted sum of those losses with respect to the hidden
state entering the head. The plain computation materialises the logits [K, V] in fp32, then log-softmax,
then its gradient, each as large again (at K = 2,048 and V = 49,152 each is 400 MB), and reads each back
from memory. Here the head runs on tiles of [rows, cols] logits that stay in the CPU's cache and keeps only
what is small:

- one pass over the vocabulary per block of rows, an online softmax (Milakov & Gimelshein 2018, "Online
  normalizer calculation for softmax"): per row a running maximum m and sum s = sum_v exp(z_v - m), rescaled
  by exp(m_old - m_new) when the maximum grows, plus the running argmax and the target's logit. At the end
  loss_i = m + log s - z_target, in nats.
- for the rows that may carry weight in the update, the same pass also accumulates
  a_i = sum_v exp(z_v - m) W_v (rescaled alike), so the gradient row d loss_i / d h_i = a_i / s - W_target
  (the standard softmax cross-entropy gradient (softmax_i - onehot_i) W) costs one more matmul per tile and
  no second pass. Only [K] losses and a [K, H] gradient survive.
- backward: d(sum_i g_i loss_i)/dh_i = g_i * (d loss_i / d h_i). Rows the caller did not expect to train
  (`train_rows`) skip the gradient matmul in the forward; if such a row does get weight it is recomputed in
  the backward, so the result never depends on the expectation, only the time does.

On CPU, rows outside the target mask are not computed at all, and tiles are small (CPU_TILE_BYTES). On an
accelerator every target row gets its gradient row, masked arithmetically (an index lookup would wait for the
device), with the whole vocabulary in one tile of up to CUDA_CHUNK_BYTES: the same formulas, fewer kernels.

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

CPU_TILE_BYTES = 8 * 2**20  # fp32 logits per tile on CPU: [rows, cols] stays in the last-level cache
CPU_TILE_ROWS = 1024  # rows per tile on CPU (the matmuls run at full speed from about 256 rows)
CPU_MIN_COLS = 1024  # at least this many vocabulary columns per tile
CUDA_CHUNK_BYTES = 512 * 2**20  # on an accelerator: the whole vocabulary per tile, rows up to this size

_verified: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def all_rows_at_once(device: torch.device) -> bool:
    """Whether gradient rows are computed for every target row, masked arithmetically (accelerators: no host
    sync), rather than only for the rows expected to train, found by indexing (CPU: less work)."""
    return device.type != "cpu"


def tile_shape(n: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(rows, cols) of one tile of logits for `n` rows: on CPU at most CPU_TILE_ROWS rows and about
    CPU_TILE_BYTES of fp32; on an accelerator the whole vocabulary and about CUDA_CHUNK_BYTES."""
    if all_rows_at_once(device):
        return max(8, CUDA_CHUNK_BYTES // (4 * vocab)), vocab
    rows = max(1, min(n, CPU_TILE_ROWS))
    return rows, min(vocab, max(CPU_MIN_COLS, CPU_TILE_BYTES // (4 * rows)))


def _online(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, cols: int,
            grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over the vocabulary in tiles of `cols` columns for rows h [c, H] with targets y [c]:
    loss [c] fp32 (nats), argmax [c] long, and if `grads` the gradient rows d loss_i / d h_i [c, H] fp32."""
    c, vocab = h.shape[0], weight.shape[0]
    m = torch.full((c,), float("-inf"), device=h.device)  # running max of the logits
    s = torch.zeros(c, device=h.device)  # running sum of exp(z - m)
    best = torch.full((c,), float("-inf"), device=h.device)
    arg = torch.zeros(c, dtype=torch.long, device=h.device)
    target = torch.zeros(c, device=h.device)
    acc = torch.zeros(c, h.shape[1], device=h.device) if grads else None  # running sum of exp(z - m) W
    for v0 in range(0, vocab, cols):
        w = weight[v0:v0 + cols]
        z = F.linear(h, w, None if bias is None else bias[v0:v0 + cols]).float()  # [c, cols]
        top, at = z.max(dim=1)  # the first maximum, as argmax picks it
        better = top > best
        best, arg = torch.where(better, top, best), torch.where(better, at + v0, arg)
        inside = (y >= v0) & (y < v0 + z.shape[1])
        picked = z.gather(1, (y - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
        target = torch.where(inside, picked, target)
        m_new = torch.maximum(m, top)
        scale = torch.exp(m - m_new)
        e = z.sub_(m_new[:, None]).exp_()
        s = s * scale + e.sum(dim=1)
        if acc is not None:
            acc.mul_(scale[:, None])
            if w.dtype == torch.float32:
                acc.addmm_(e, w)
            else:
                acc += (e.to(w.dtype) @ w).float()
        m = m_new
    loss = m + s.log() - target
    grad = None if acc is None else acc.div_(s[:, None]).sub_(weight[y].float())
    return loss, arg, grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss [N] fp32 (0 where not mask), correct [N] bool from h [N, H] through logits = h W^T + b."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                mask: torch.Tensor, train_rows: torch.Tensor | None, rows: int, cols: int,
                grad_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = h.shape[0]
        loss = torch.zeros(n, dtype=torch.float32, device=h.device)
        correct = torch.zeros(n, dtype=torch.bool, device=h.device)
        want_grad = ctx.needs_input_grad[0] and grad_mode  # grad mode is always off in here: the caller's
        grad_rows = torch.zeros(n, h.shape[1], dtype=torch.float32, device=h.device) if want_grad else None
        have = torch.zeros(n, dtype=torch.bool, device=h.device)
        ctx.complete = all_rows_at_once(h.device)
        if ctx.complete:  # every row, masked arithmetically: no host sync to learn which rows
            for s in range(0, n, rows):
                li, arg, g = _online(h[s:s + rows], weight, bias, labels[s:s + rows], cols, want_grad)
                loss[s:s + rows], correct[s:s + rows] = li, arg == labels[s:s + rows]
                if g is not None:
                    grad_rows[s:s + rows] = g * mask[s:s + rows, None]
        else:  # only the target rows; the gradient matmul only for those expected to train
            train = torch.zeros_like(mask) if not want_grad else mask if train_rows is None else mask & train_rows
            for part, grads in ((train, True), (mask & ~train, False)):
                idx = part.nonzero()[:, 0]
                for s in range(0, idx.numel(), rows):
                    i = idx[s:s + rows]
                    li, arg, g = _online(h[i], weight, bias, labels[i], cols, grads)
                    loss[i], correct[i] = li, arg == labels[i]
                    if g is not None:
                        grad_rows[i], have[i] = g, True
        loss = loss * mask
        correct = correct & mask
        ctx.mark_non_differentiable(correct)
        ctx.rows, ctx.cols = rows, cols
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), labels, mask, grad_rows, have)
        ctx.has_bias = bias is not None
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor) -> tuple:
        h, weight, bias, labels, mask, grad_rows, have = ctx.saved_tensors
        g = grad_loss.float() * mask
        missing = have[:0].long() if ctx.complete else ((g != 0) & ~have).nonzero()[:, 0]
        for s in range(0, missing.numel(), ctx.rows):  # rows not expected to train that did: recompute them
            i = missing[s:s + ctx.rows]
            grad_rows[i] = _online(h[i], weight, bias if ctx.has_bias else None, labels[i], ctx.cols, True)[2]
        grad_h = (g[:, None] * grad_rows).to(h.dtype)
        return grad_h, None, None, None, None, None, None, None, None


def chunked_head_loss(h: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, mask: torch.Tensor,
                      train_rows: torch.Tensor | None = None, rows: int | None = None,
                      cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and argmax-correct through a linear head, in tiles of logits.

    Args:
        h: [N, H] hidden states entering the head (any float dtype; may require grad).
        head: the frozen ``nn.Linear`` LM head, weight [V, H].
        labels: [N] long target token ids.
        mask: [N] bool, which rows are targets (others get loss 0, correct False and no gradient).
        train_rows: optional [N] bool, the rows expected to carry weight in this step's update (say, those
            that did in the last one); on CPU only they get their gradient row in the forward. Only an
            optimisation: a row outside it that does get weight is recomputed in the backward. None: all.
        rows, cols: the tile shape (default ``tile_shape``).
    Returns:
        loss [N] fp32 in nats (differentiable with respect to h), correct [N] bool.
    """
    r, c = tile_shape(h.shape[0], head.weight.shape[0], h.device)
    return _ChunkedHeadLoss.apply(h, head.weight, head.bias, labels, mask, train_rows, rows or r, cols or c,
                                  torch.is_grad_enabled())


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
