"""stackwise: train transformers along an explicit timeline."""

__version__ = "0.1.0"
