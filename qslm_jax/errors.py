"""Project exception types: one per failure family (design.md, "Errors").

Every message says what was expected, what was found, and what to do.
"""


class QSLMError(Exception):
    """Base class of every error this library raises on purpose."""


class ConversionError(QSLMError):
    """A checkpoint could not be read or does not match the model (keys, shapes, variant)."""


class ConfigError(QSLMError):
    """A configuration or plan is invalid (unknown preset, unit, bit width, flag combination)."""


class DataError(QSLMError):
    """A dataset, tokenizer or data directory is missing or malformed."""


class ConstraintError(QSLMError):
    """A search constraint cannot be met (for example: no candidate is feasible)."""


class TrainingError(QSLMError):
    """Training cannot go on: a non-finite loss or update (divergence), or no readable checkpoint to resume."""


class DistributedError(QSLMError):
    """A multi-process run cannot go on: another process died or its link failed (rerun every process)."""
