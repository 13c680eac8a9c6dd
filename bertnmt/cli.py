"""What the entry points share: checking the command line before Hydra starts a run, and turning
every user mistake, interruption or full disk into one line on stderr and an exit code.

``check_command_line`` composes the config exactly as Hydra will (overrides, groups, schema types)
and checks that the run folder can be created, so that an unknown key or group option, a bad value
or an unwritable ``hydra.run.dir`` is one ``error: ...`` line, with no run folder left behind (Hydra's
own report of these is several lines, or a traceback). It imports neither torch nor the model, and sets
up the host allocator for them (``bertnmt.core.host_memory``).
"""
from __future__ import annotations

import difflib
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bertnmt.core.atomic import check_writable
from bertnmt.core.errors import BertNMTError, ConfigError, TrainingInterrupted, one_line
from bertnmt.core.host_memory import tune_host_memory

# Every script imports this module before torch, and the allocator must be set up before torch's first
# allocation: large CPU tensors then reuse memory instead of faulting in fresh pages at every step.
tune_host_memory()


def _schema_node(schema: Any, key: str) -> str | None:
    """Why ``key`` is not a key of the schema (a sentence), or None when it is one.

    Keys below a free-form dict (``data.custom.<split>.<side>``) or a list are accepted as they are.
    """
    from omegaconf import DictConfig, ListConfig

    node, path = schema, []
    for part in key.split("."):
        free = isinstance(node, DictConfig) and node._metadata.object_type in (None, dict)
        if isinstance(node, ListConfig) or free:
            return None
        if not isinstance(node, DictConfig) or part not in node:
            where = ".".join(path) or "the config"
            known = list(node.keys()) if isinstance(node, DictConfig) else []
            close = difflib.get_close_matches(part, [str(k) for k in known], n=1)
            hint = f"; did you mean {'.'.join([*path, close[0]])}?" if close else ""
            return f"{where} has no key {part!r}{hint}"
        node = node._get_node(part)
        path.append(part)
    return None


def check_keys(conf_dir: Path, argv: list[str]) -> None:
    """Every override sets a key of the schema, also with ``+``/``++`` (which Hydra lets add any key, which
    then nothing reads); group choices (``model=tiny``, ``+exp=...``) and ``hydra.*`` are Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from bertnmt.core.config import Config

    try:
        overrides = OverridesParser.create().parse_overrides(argv)
    except Exception as e:  # a syntax error: Hydra reports it when composing
        raise ConfigError(one_line(e)) from None
    schema = OmegaConf.structured(Config)
    for o in overrides:
        key = o.key_or_group
        if key.split(".")[0] == "hydra" or "/" in key or (conf_dir / key).is_dir() or o.is_delete():
            continue
        why = _schema_node(schema, key)
        if why is not None:
            raise ConfigError(f"{o.input_line}: {why}")


def check_command_line(conf_dir: Path, argv: list[str], config_name: str = "config") -> None:
    """Compose ``argv``'s overrides like Hydra will; a ConfigError names the key, value or option at fault.

    Also checks the values (:func:`bertnmt.core.config.check_values`) and that ``data.cache_dir`` can be
    written. Command lines with Hydra flags (``--multirun``, ``--cfg``, ``--help``, ...) are left to Hydra.
    """
    if any(a.startswith("-") for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from bertnmt.core.config import check_values, register_configs, to_config

    register_configs()
    check_keys(conf_dir, argv)
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=Path(sys.argv[0]).stem):
            dcfg = compose(config_name, overrides=argv, return_hydra_config=True)
        run_dir = OmegaConf.select(dcfg, "hydra.run.dir", throw_on_resolution_failure=False)
        with open_dict(dcfg):
            del dcfg["hydra"]
        cfg = to_config(dcfg)  # types against the schema
    except BertNMTError:
        raise
    except Exception as e:  # Hydra's and OmegaConf's many exception types
        raise ConfigError(one_line(e)) from None
    check_values(cfg)
    if isinstance(run_dir, str):
        check_writable(Path(run_dir), "hydra.run.dir")
    check_writable(Path(cfg.data.cache_dir), "data.cache_dir")


def exit_code(fn: Callable[[], object]) -> int:
    """Run ``fn``; a user mistake, an interruption or a full disk is one line on stderr and an exit code.

    BertNMTError -> ``error: ...``, 2. TrainingInterrupted (SIGTERM / SIGINT) -> its message, 128 + the
    signal. A second Ctrl-C -> 130. No space left on device -> 2. Anything else is a bug: a traceback.
    """
    try:
        fn()
    except BertNMTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("error: interrupted without saving; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on device while writing {e.filename or 'an output file'}; free some space and "
              "rerun the same command to resume", file=sys.stderr)
        return 2
    return 0


def tool_exit_code(fn: Callable[[], object]) -> int:
    """``exit_code`` for the tools after training (evaluate, translate, export, average_checkpoints).

    BertNMTError (an OutputError for a write that failed) -> ``error: ...``, 2. A reader that closed the
    pipe (``translate.py ... | head -1``) ends the tool quietly with 141 (128 + SIGPIPE), as coreutils
    do. Ctrl-C -> 130 with one line. No space left on device -> 2. Anything else is a bug: a traceback.
    """
    try:
        fn()
    except BertNMTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Python would report the pipe again when it flushes stdout at exit: point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a descriptor (captured in-process)
            pass
        finally:
            os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on device while writing {e.filename or 'an output file'}", file=sys.stderr)
        return 2
    return 0
