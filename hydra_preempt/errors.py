"""Errors a user can cause and fix. They carry a message meant to be read, not a traceback."""


class HydraPreemptError(Exception):
    """Base class of the errors reported to the user as one clear message."""


class ConfigError(HydraPreemptError):
    """A configuration value is invalid; raised before anything runs."""


class CheckpointDirError(HydraPreemptError):
    """The checkpoint directory cannot be created or written to."""


class CheckpointWriteError(HydraPreemptError):
    """A checkpoint could not be written; the previous checkpoints are intact."""


class RunDirWriteError(HydraPreemptError):
    """A file of the run directory (result.json) could not be written (disk full, ...)."""


class OutputWriteError(HydraPreemptError):
    """A file a command was asked to write (export's --out) could not be written (disk full, I/O error)."""


class CheckpointReadError(HydraPreemptError):
    """A verified checkpoint could not be read into this run; nothing was loaded, the checkpoint stays."""


class CheckpointMismatchError(HydraPreemptError):
    """A checkpoint does not fit the registered objects (different model, keys or shapes)."""


class UnsupportedStateError(HydraPreemptError):
    """A state dict holds a value that the checkpoint format cannot store safely."""
