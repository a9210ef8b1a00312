"""Moved to `stackwise.training.factories`; kept so that `stackwise.framework.factories`
imports keep working."""

from stackwise.training.factories import build_data_loader, build_model, build_optimizer

__all__ = ["build_data_loader", "build_model", "build_optimizer"]
