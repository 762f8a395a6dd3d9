"""User-facing errors.

Every error a user can cause (a bad config, bad data, a checkpoint or adapter that
does not fit) is one of these, with a message that names the bad value and what
would be valid. Anything else escaping jaxft is a bug in jaxft.
"""


class JaxftError(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(JaxftError, ValueError):
    """A config key or value is unknown, missing or out of range."""


class DataError(JaxftError, ValueError):
    """A data file or row cannot be used; the message names file and row."""


class ModelLoadError(JaxftError, ValueError):
    """A model directory or checkpoint does not match the architecture it declares."""


class AdapterError(JaxftError, ValueError):
    """An adapter does not fit its base model (targets, shapes, ranks)."""


class CheckpointError(JaxftError, RuntimeError):
    """A training checkpoint is missing, corrupt, or from an incompatible run."""


class TrainingDivergedError(JaxftError, RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class WorkdirInUseError(JaxftError, RuntimeError):
    """Another run holds the workdir's lock."""


class SweepStoppedError(JaxftError, RuntimeError):
    """A hyperparameter sweep stopped because its trials keep failing; finished trials are kept."""
