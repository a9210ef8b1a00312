"""Moved to `stackwise.training.adapters` (the training package owns the planes the machine
drives); kept so that `stackwise.framework.adapters` imports keep working."""

from stackwise.training.adapters import DataAdapter, ModelAdapter, OptimizerAdapter

__all__ = ["DataAdapter", "ModelAdapter", "OptimizerAdapter"]
