"""User-facing errors: each is printed as one line by the entry points, never as a traceback."""


class BertNMTError(Exception):
    """Base class: a problem with the user's input (file, key or value), not a bug."""


class ConfigError(BertNMTError):
    """A configuration key or value is invalid."""


class DataError(BertNMTError):
    """A corpus file is missing, unreadable or inconsistent."""


class CheckpointError(BertNMTError):
    """A checkpoint is missing, corrupt or incompatible."""
