"""Loss and quality figures computed from a model's logits and a `Batch`."""

from __future__ import annotations

import math
from typing import Literal

import torch

from stackwise.data.batch import Batch
from stackwise.model.head_loss import plain_cross_entropy_sum


def loss_sum(head: torch.nn.Module, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Σ cross-entropy · weight over the batch's loss positions (nats), from the rack's output.

    The head projects only the positions in the loss: masked objectives skip the logits of the
    ~85% of positions nobody scores (clm scores every position with weight 1, unless the batch
    says `partial_loss`: a user batch with `-100` labels or padding). The projection and
    the cross-entropy are fused in row chunks (`Head.loss_sum`)."""
    if batch.objective == "clm" and not batch.partial_loss:
        return head.loss_sum(hidden.flatten(0, 1), batch.labels.flatten())
    where = batch.loss_mask
    return head.loss_sum(hidden[where], batch.labels[where], batch.loss_weight[where])


def token_loss(
    logits: torch.Tensor, batch: Batch, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Cross-entropy over the batch's loss positions, each weighted by `batch.loss_weight`.

    "sum" gives Σ ce·w in nats (what bits per byte accumulates); "mean" divides that by
    `batch.n_target_tokens`: the number of loss positions for clm and mlm (a plain mean), and
    B·T for diffusion (the MDLM/LLaDA normalization of the 1/r-weighted masked loss).
    Cross-entropy is computed in fp32 whatever the logits' dtype.
    """
    where = batch.loss_mask
    total = plain_cross_entropy_sum(logits[where], batch.labels[where], batch.loss_weight[where])
    return total if reduction == "sum" else total / batch.n_target_tokens


def bits_per_byte(total_loss_nats: float, n_bytes: int) -> float:
    """bits/byte = total_loss_nats / (ln 2 · n_bytes).

    `total_loss_nats` is the summed (not averaged) loss over the target tokens, e.g. the sum of
    `token_loss(..., reduction="sum")` over the validation batches, and `n_bytes` the UTF-8 byte
    count of those same target tokens (the sum of `batch.n_target_bytes`). Dividing by bytes
    instead of tokens makes runs with different tokenizers comparable.
    """
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return total_loss_nats / (math.log(2) * n_bytes)
