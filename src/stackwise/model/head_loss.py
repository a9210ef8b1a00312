"""The head's projection and the cross-entropy, fused and computed in row chunks.

Computing the loss the plain way (`logits = h @ Wᵀ`, then `F.cross_entropy`) keeps three
positions × vocab tensors alive through the backward pass (the logits, their log-softmax and its
gradient) and walks each of them several times. Here the loss is a scalar whose gradient is known
in closed form, so the forward pass computes it directly, a chunk of rows at a time:

    logits_c = h_c @ Wᵀ                 (the chunk's logits, fp32 for the softmax)
    loss    += Σ w · (logsumexp(logits_c) − logits_c[label])
    G_c      = w · (softmax(logits_c) − onehot(label))      (in place of the logits)
    ∂h_c     = G_c @ W,   ∂W += G_cᵀ @ h_c

and the backward pass only scales the stored ∂h, ∂W in place by the incoming gradient and hands
them on (so one backward pass per forward: a second, with `retain_graph`, raises). Only one chunk of
logits exists at a time (a few MiB on CPU), the matrix products are those the plain path runs, and
the softmax passes are fewer. On the reference shape the head and loss alone take ~50 ms instead
of ~80 ms for logits + `F.cross_entropy` (about 1.06× a whole machine step, benchmarks/hot_path.py),
and the positions × vocab terms leave the step's peak memory (training/memory.py).

Under autocast the three matrix products run in the autocast dtype (as `nn.Linear` would) and
the softmax in fp32. A head that is not a plain `nn.Linear` weight (a sharded DTensor, adapters)
takes the plain path, which computes the same value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CPU_CHUNK_BYTES = 4 << 20  # fp32 logits per chunk on CPU: stays in cache (256 rows at vocab 4096)
CUDA_CHUNK_BYTES = 256 << 20  # on CUDA: big enough to keep the GPU busy, small next to whole logits


def chunk_rows(vocab_size: int, device: torch.device, n_rows: int) -> int:
    """Rows per chunk: fp32 logits of about CPU_CHUNK_BYTES / CUDA_CHUNK_BYTES, at least 16 rows
    (or all of them), at least 1 (a batch with no loss positions still loops correctly)."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    return max(1, min(n_rows, max(16, budget // (4 * vocab_size))))


def linear_cross_entropy_sum(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ w · CE(hidden @ head.weightᵀ, labels) over rows (nats, fp32); hidden (N, d), labels (N,).

    Equal to `F.cross_entropy(head(hidden).float(), labels, reduction="none")` weighted and summed,
    to fp32 rounding, with gradients for hidden and the head's weight."""
    weight = head.weight
    if not _plain_weight(head):
        return plain_cross_entropy_sum(head(hidden), labels, weights)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    rows = chunk_rows(weight.shape[0], hidden.device, hidden.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        with torch.autocast(device_type, enabled=False):
            return _loss_only(hidden, weight, labels, weights, dtype, rows)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, weights, dtype, rows)


def _plain_weight(head: nn.Module) -> bool:
    """A bias-free nn.Linear whose weight is an ordinary tensor (no DTensor shard, no NF4)."""
    return (type(head) is nn.Linear and head.bias is None
            and type(head.weight) in (nn.Parameter, torch.Tensor))


def plain_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Σ ce·w over rows of logits (N, V); cross-entropy in fp32 whatever the logits' dtype."""
    if weights is None:
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    return (F.cross_entropy(logits.float(), labels, reduction="none") * weights).sum()


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·ce of the chunk, per-row logsumexp) from fp32 logits."""
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(1, labels[:, None]).squeeze(1)
    return (ce.sum() if weights is None else (ce * weights).sum()), lse


def _chunks(hidden, w, labels, weights, dtype, rows):
    """Per chunk of rows: (rows slice, hidden rows in `dtype`, labels, fp32 weights or None, fp32 logits)."""
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        h = hidden[part].to(dtype)
        yield part, h, labels[part], None if weights is None else weights[part].float(), (h @ w.t()).float()


def _loss_only(hidden, weight, labels, weights, dtype, rows) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for _, _, y, wt, logits in _chunks(hidden, weight.to(dtype), labels, weights, dtype, rows):
        total += _chunk_loss(logits, y, wt)[0]
    return total


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, dtype, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for part, h, y, wt, logits in _chunks(hidden, w, labels, weights, dtype, rows):
                loss, lse = _chunk_loss(logits, y, wt)
                total += loss
                # softmax − onehot, written over the logits (they are not needed any more)
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(y), device=y.device), y] -= 1
                if wt is not None:
                    grad.mul_(wt[:, None])
                grad = grad.to(dtype)
                if need_h:
                    grad_h[part] = grad @ w
                if need_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(grad.t(), h)
                    else:
                        grad_w += grad.t() @ h
        # Held on ctx, not saved for backward: they are this function's own results, which
        # backward scales in place and hands on, so no second copy of ∂W (vocab × d) or ∂h exists.
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused head + cross-entropy was already backpropagated: it hands its stored gradients on "
                "(scaled in place) to save memory, so it supports one backward pass; for a second one "
                "(retain_graph=True) compute the loss from logits (model.head(hidden), then F.cross_entropy)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.mul_(grad_total.to(grad.dtype))
        return grad_h, grad_w, None, None, None, None
