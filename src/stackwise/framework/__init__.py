"""The framework: specs that describe each plane, the adapters the machine drives, and the
factories that build each plane from a config or accept a ready-made object."""

# Adapters and factories import the model and training packages, which import the specs above.
from stackwise.framework.adapters import DataAdapter, ModelAdapter, OptimizerAdapter
from stackwise.framework.factories import build_data_loader, build_model, build_optimizer
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
    "DataAdapter",
    "DataSpec",
    "EmbeddingSpec",
    "HeadSpec",
    "ModelAdapter",
    "ModelSpec",
    "OptimizerAdapter",
    "OptimizerSpec",
    "RackSpec",
    "SpecError",
    "build_data_loader",
    "build_model",
    "build_optimizer",
    "validate_training_state",
]
