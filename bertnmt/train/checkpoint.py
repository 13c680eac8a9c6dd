"""Checkpoints: atomic writes, safe loading, rotation, fallback to the previous good one, warm start.

A checkpoint is a plain dict of tensors and primitives, loaded with
``torch.load(weights_only=True)`` (nothing is unpickled). A frozen pretrained encoder's
weights are not stored: only its name, path and a hash (``meta["bert"]``).

Files of one stage, ``<run>/checkpoints/<stage>/``:

- ``checkpoint_<epoch>_<step>.pt``: every ``trainer.save_every_steps`` updates (the last
  ``trainer.keep_last`` are kept), mid-epoch, with the position inside the epoch;
- ``checkpoint_last.pt``: the newest state (a step checkpoint or the end of an epoch);
- ``checkpoint_best.pt``: the end of the epoch with the best validation score.

Every file is written to a temporary file in the same folder, fsynced and renamed, so a kill
or a full disk never leaves a half-written checkpoint under a checkpoint's name.
"""
from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bertnmt.train import distributed
from bertnmt.core.atomic import DISK_FULL, atomic_path, copy_file, is_temp
from bertnmt.core.errors import CheckpointError
from bertnmt.model.fusion import drop_net_generator

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # new keys are optional: a version-1 file without them is an end-of-epoch checkpoint
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
_STEP_NAME = re.compile(r"checkpoint_(\d+)_(\d+)\.pt")


def _write_error(path: Path, err: OSError) -> CheckpointError:
    if err.errno in DISK_FULL:
        return CheckpointError(f"no space left on device while writing checkpoint {path}; the previous checkpoint "
                               "is intact: free some space and rerun the same command to resume")
    return CheckpointError(f"cannot write checkpoint {path} ({err.strerror or err})")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`bertnmt.core.atomic.atomic_path`: temp file, fsync, rename).

    On any failure the temp file is removed and ``path`` keeps its previous content; a full disk
    or another OS error is a :class:`CheckpointError`. Under torchrun only rank 0 writes; on the
    other ranks this does nothing.
    """
    if not distributed.is_main():
        return
    with atomic_path(path, _write_error) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` an atomic copy of the finished checkpoint ``src`` (a hard link where possible)."""
    copy_file(src, dst, _write_error)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; a missing, truncated, corrupt, unsafe or foreign file is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(f"checkpoint {path} holds a pickled Python object ({unsafe[1]}), not only tensors "
                                  "and plain values; refusing to load it (weights_only=True)") from None
        raise CheckpointError(f"checkpoint {path} cannot be read: truncated or corrupt (not a torch.save file)") from None
    except Exception as e:  # torch raises many types for truncated/corrupt files
        first = str(e).splitlines()[0].split(". ")[0][:100] if str(e) else ""
        raise CheckpointError(f"checkpoint {path} cannot be read: truncated or corrupt ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a bertnmt checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this bertnmt reads version {FORMAT_VERSION}")
    return ckpt


# -- the checkpoints of one stage -------------------------------------------------------------------
def step_checkpoint(folder: Path, epoch: int, step: int) -> Path:
    return folder / f"checkpoint_{epoch}_{step}.pt"


def step_checkpoints(folder: Path) -> list[Path]:
    """The stage's step checkpoints, oldest first (by epoch, then step)."""
    if not folder.is_dir():
        return []
    found = [(m, p) for p in folder.iterdir() if (m := _STEP_NAME.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0][1]), int(mp[0][2])))]


def rotate(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``checkpoint_last.pt`` is a separate file)."""
    for old in step_checkpoints(folder)[: -keep if keep > 0 else None]:
        old.unlink(missing_ok=True)


def remove_temp_files(folder: Path) -> None:
    """Temp files of saves that a kill interrupted (the run folder's lock keeps other processes out)."""
    if folder.is_dir():
        for tmp in folder.iterdir():
            if is_temp(tmp) or tmp.suffix == ".tmp":
                tmp.unlink(missing_ok=True)


def position(ckpt: dict[str, Any]) -> tuple[int, int, int, int]:
    """Where in training a checkpoint was taken: (epoch, epoch finished, batches done, step), for ordering."""
    pos = ckpt.get("position") or {}
    done = bool(pos.get("epoch_done", True))
    return int(ckpt.get("epoch", 0)), int(done), int(pos.get("batches_done", 0)), int(ckpt.get("step", 0))


def latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a stage, or None when it has none.

    ``checkpoint_last.pt`` is the newest, unless a kill came between writing a step checkpoint and
    linking it as the last one. When it cannot be read (a warning names it), the newest readable one
    of the step checkpoints and ``checkpoint_best.pt`` is used.
    """
    steps = step_checkpoints(folder)
    rest = [p for p in [*reversed(steps), folder / BEST] if p.is_file()]
    best: tuple[Path, dict[str, Any]] | None = None
    failures: list[str] = []
    if (folder / LAST).is_file():
        try:
            best = (folder / LAST, load_checkpoint(folder / LAST))
        except CheckpointError as e:
            log.warning("%s; falling back to the previous good checkpoint", e)
            failures.append(LAST)
        else:
            newest = _STEP_NAME.fullmatch(steps[-1].name) if steps else None
            if newest is None or (int(newest[1]), int(newest[2])) <= (int(best[1]["epoch"]), int(best[1]["step"])):
                return best
    elif not rest:
        return None
    fallback = best is None
    for path in rest:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("%s; skipping it", e)
            failures.append(path.name)
            continue
        if best is None or position(ckpt) > position(best[1]):
            best = (path, ckpt)
    if best is None:
        raise CheckpointError(f"no readable checkpoint in {folder} (tried {', '.join(failures)}); "
                              "delete the folder to train this stage from the start")
    if fallback or best[0].name != LAST:
        log.warning("resuming from %s instead", best[0])
    return best


# -- random number generators -----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG's state (torch, CUDA, numpy, Python's ``random``) as tensors and plain values (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if (gen := drop_net_generator()) is not None:  # drop-net's own generator under DDP
        state["drop_net"] = gen.getstate()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if isinstance(state.get("drop_net"), (tuple, list)) and (gen := drop_net_generator()) is not None:
        version, internal, gauss = state["drop_net"]  # a Python RNG's state (older files held a torch one)
        gen.setstate((version, tuple(internal), gauss))


# -- weights ----------------------------------------------------------------------------------------
def model_weights(model: nn.Module, include_bert: bool) -> dict[str, torch.Tensor]:
    """The model's weights, without the pretrained encoder's unless it trains."""
    sd = model.state_dict()
    if not include_bert:
        sd = {k: v for k, v in sd.items() if not k.startswith("bert.")}
    return {k: v.detach().cpu() for k, v in sd.items()}


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load weights saved by :func:`model_weights`; the pretrained encoder may be absent."""
    ours = model.state_dict()
    for k, v in weights.items():
        if k in ours and ours[k].shape != v.shape:
            raise CheckpointError(f"checkpoint {source}: {k} has shape {tuple(v.shape)} but the model expects "
                                  f"{tuple(ours[k].shape)} (other vocabulary or dimensions)")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("bert.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def warm_start(model: nn.Module, path: str | Path, vocab_sha256: str) -> list[str]:
    """Initialise the NMT part of a fused model from a plain Transformer checkpoint (paper section 5).

    Every NMT weight must load; only the new BERT-attention modules (and the pretrained
    encoder) may be missing. Returns the names of the parameters that kept their init.
    The new modules are the report groups "bert" and "fusion" (:func:`bertnmt.train.freeze_rules.param_group`,
    which also covers the ablations' stacked LayerNorms, layer mix and input projection).
    """
    from bertnmt.train.freeze_rules import param_group

    ckpt = load_checkpoint(path)
    theirs = ckpt.get("meta", {}).get("vocab_sha256")
    if theirs and theirs != vocab_sha256:
        raise CheckpointError(
            f"warm-start checkpoint {path} was trained with another vocabulary "
            f"(SentencePiece sha256 {theirs[:12]} vs this data's {vocab_sha256[:12]})"
        )
    ours = model.state_dict()
    for k, v in ckpt["model"].items():
        if k in ours and ours[k].shape != v.shape:
            raise CheckpointError(
                f"warm-start checkpoint {path}: {k} has shape {tuple(v.shape)} but the model expects {tuple(ours[k].shape)} "
                "(other vocabulary or dimensions)"
            )
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected:
        raise CheckpointError(f"warm-start checkpoint {path} has weights the model lacks: {unexpected[:3]}")
    bad = [k for k in missing if param_group(k) not in ("bert", "fusion")]
    if bad:
        raise CheckpointError(f"warm-start checkpoint {path} lacks NMT weights: {bad[:3]}")
    new = [k for k in missing if not k.startswith("bert.")]
    log.info("warm start from %s: %d tensors loaded, %d new (BERT attention)", path, len(ckpt["model"]), len(new))
    return new
