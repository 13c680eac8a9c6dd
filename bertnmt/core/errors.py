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


_NOISE = ("full_key:", "reference_type=", "object_type=", "See https://", "Set the environment variable HYDRA_FULL_ERROR")


def one_line(exc: BaseException) -> str:
    """A Hydra / OmegaConf exception (and its cause) as one line, without the key-path and search-path noise."""
    parts: list[str] = []
    options: list[str] = []
    keys: list[str] = []
    skip = False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for line in str(e).splitlines():
            text = line.strip()
            if text.startswith("full_key:") and text[9:].strip():
                keys.append(text[9:].strip())
            if not text or text.startswith(_NOISE):
                continue
            if text.startswith("Config search path"):
                skip = True
            elif line.startswith("\t") and options and not skip:
                options.append(text)
            elif not line.startswith("\t"):
                skip = False
                if text.startswith("Available options"):
                    options = [text.rstrip(":") + ":"]
                else:
                    parts.append(text.rstrip("."))
        if options:
            parts.append(options[0] + " " + ", ".join(options[1:]))
            options = []
        e = e.__cause__
    out = "; ".join(parts) or type(exc).__name__
    missing = [k for k in dict.fromkeys(keys) if k not in out]
    return out + (f" (key {', '.join(missing)})" if missing else "")
