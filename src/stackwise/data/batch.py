"""`Batch`: one step's worth of corrupted token windows, ready for a model and a loss."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Batch:
    """Inputs, targets and loss weights of one step.

    The training loss is `sum(ce * loss_weight) / n_target_tokens` (see `training.metrics.token_loss`):
    clm and mlm average over the positions in the loss; diffusion divides by B·T, because its
    1/r-weighted sum estimates the negative log-likelihood of every token of the window.
    `n_target_bytes` is the UTF-8 size of those same target tokens, for bits per byte.
    """

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool
    loss_weight: torch.Tensor  # (B, T) float32; 0 outside the loss
    sample_ids: torch.Tensor  # (B,) long: window index in the split, the sample's identity
    attention_mode: str  # "causal" | "bidirectional"
    objective: str  # "clm" | "mlm" | "diffusion"
    n_target_tokens: int  # the loss's denominator
    n_target_bytes: int  # exact UTF-8 bytes of the target tokens
    mask_rates: torch.Tensor | None = None  # (B,) float32: per-sample corruption rate (None for clm)
    # clm only: some positions are out of the loss (a user batch's `-100` labels or padding), so
    # the loss uses `loss_mask` instead of scoring every position (training/user_data.py).
    partial_loss: bool = False

    @property
    def n_tokens(self) -> int:
        """Tokens fed to the model (B·T)."""
        return self.input_ids.numel()

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            loss_mask=move(self.loss_mask),
            loss_weight=move(self.loss_weight),
            sample_ids=move(self.sample_ids),
            mask_rates=move(self.mask_rates),
        )
