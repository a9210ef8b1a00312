"""The error of a run that cannot go on; every part of training raises it, the CLI reports it."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable run directory, ...); the message says why."""
