"""User-facing errors: each is printed as one line by the entry points, never as a traceback."""


class BertNMTError(Exception):
    """Base class: a problem with the user's input (file, key or value), not a bug."""


class ConfigError(BertNMTError):
    """A configuration key or value is invalid."""


class DataError(BertNMTError):
    """A corpus file is missing, unreadable or inconsistent."""


class CheckpointError(BertNMTError):
    """A checkpoint is missing, corrupt or incompatible, or cannot be written."""


class TrainingError(BertNMTError):
    """Training cannot go on (e.g. too many non-finite losses in a row); the message names the step."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary after a checkpoint was saved.

    Not a :class:`BertNMTError`: the entry point exits with 128 + the signal number, and a rerun of
    the same command resumes from ``path``.
    """

    def __init__(self, signum: int, step: int, path: str) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}; rerun the same command to resume")


class OutputError(BertNMTError):
    """An output file cannot be written (a full disk, a read-only folder); the message names the path."""
