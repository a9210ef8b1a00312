"""The framework: specs that describe each plane, the adapters the machine drives, and the
factories that build each plane from a config or accept a ready-made object.

One public face over three homes, imported in one direction only: the specs live in
`stackwise.specs` (below everything), the adapters and factories in `stackwise.training`
(`adapters.py`, `factories.py`), which never imports this package."""

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
from stackwise.training.adapters import DataAdapter, ModelAdapter, OptimizerAdapter
from stackwise.training.factories import build_data_loader, build_model, build_optimizer

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
