"""Specs that describe each plane, and the check that they fit together."""

from stackwise.specs import (
    BatchSpec,
    DataSpec,
    EmbeddingSpec,
    HeadSpec,
    ModelSpec,
    OptimizerSpec,
    RackSpec,
    SpecError,
    validate_training_state,
)

__all__ = [
    "BatchSpec",
    "DataSpec",
    "EmbeddingSpec",
    "HeadSpec",
    "ModelSpec",
    "OptimizerSpec",
    "RackSpec",
    "SpecError",
    "validate_training_state",
]
