"""`LossForward`: one micro-batch's summed loss as a single module call.

DDP and FSDP2 act at module calls (DDP readies its gradient reduction in forward; FSDP2 gathers a
unit's parameters in forward hooks), so all a step computes (the frozen trunk or its cached
output, the stacks that train, the head and the loss) happens inside this one forward: the unit
the machine wraps. In a single process it is called as is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stackwise.data.batch import Batch
from stackwise.model import StackWiseModel
from stackwise.training.cache import TrunkCache
from stackwise.training.metrics import loss_sum


def _each_rank_alone(hit: bool) -> bool:
    return hit


class LossForward(nn.Module):
    """Σ cross-entropy · weight over a batch's loss positions (nats).

    Stacks below `first_trainable` are frozen: they run without autograd, and in training their
    output comes from the activation cache when it is on. `agree(hit)` says whether every rank
    hit the cache: under FSDP the trunk's blocks gather their weights collectively, so either
    all ranks run the trunk or none does."""

    def __init__(self, model: StackWiseModel, cache: TrunkCache, first_trainable: int,
                 agree: Callable[[bool], bool] = _each_rank_alone):
        super().__init__()
        self.model = model
        self.cache = cache
        self.first_trainable = first_trainable
        self.agree = agree

    def forward(self, batch: Batch) -> torch.Tensor:
        return loss_sum(self.model.head, self.hidden(batch), batch)

    def hidden(self, batch: Batch) -> torch.Tensor:
        model, mode, first = self.model, batch.attention_mode, self.first_trainable
        if first == 0:
            return model.rack(model.embedding(batch.input_ids), mode)
        if not (self.cache.active and model.training):
            with torch.no_grad():
                trunk = model.forward_from(model.embedding(batch.input_ids), 0, first, mode)
            return model.forward_from(trunk, first, None, mode)
        return model.forward_from(self._cached_trunk(batch), first, None, mode)

    def _cached_trunk(self, batch: Batch) -> torch.Tensor:
        """The trunk's output for the batch: cached rows are read, the others computed (and
        stored). Under torchrun every rank runs the trunk unless every rank has all its rows,
        so that sharded forwards stay in step; a rank that must run it along computes all rows."""
        model, mode, first, cache = self.model, batch.attention_mode, self.first_trainable, self.cache.cache
        found, rows = cache.lookup_rows(batch.sample_ids)
        if self.agree(bool(found.all())):
            cache.stats.hits += len(found)
            return rows.to(batch.input_ids.device, non_blocking=True)
        missing = ~found.to(batch.input_ids.device) if bool(found.any()) else None
        with torch.no_grad():
            ids = batch.input_ids if missing is None or not bool(missing.any()) else batch.input_ids[missing]
            computed = model.forward_from(model.embedding(ids), 0, first, mode)
        if missing is None or not bool(missing.any()):  # nothing read: every row computed
            cache.stats.misses += len(found)
            cache.store(batch.sample_ids, computed)
            return computed
        cache.stats.hits += int(found.sum())
        cache.stats.misses += int(missing.sum())
        cache.store(batch.sample_ids[missing.cpu()], computed)
        trunk = torch.empty((len(found), *computed.shape[1:]), dtype=computed.dtype, device=computed.device)
        trunk[missing] = computed
        trunk[~missing] = rows.to(computed.device, computed.dtype)
        return trunk
