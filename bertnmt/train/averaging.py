"""Checkpoint averaging: the elementwise mean of the weights of several checkpoints of one run.

Like fairseq's ``average_checkpoints.py`` (Vaswani et al. average the last 5-20 checkpoints),
but checked: every checkpoint must hold the same tensors with the same shapes, and record the same
vocabulary, model config and pretrained encoder (tensors of equal shapes can still mean different
things); the output must not be one of the inputs. Floating-point
weights are summed in float64 and divided once, then cast back; other tensors (integer buffers)
must agree and are copied. The result is a checkpoint of the usual format version, written
atomically, without optimizer state: ``evaluate``, ``translate`` and ``export`` accept it, training
does not resume from it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from bertnmt.train.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from bertnmt.core.errors import CheckpointError

log = logging.getLogger(__name__)

STAGES = ("fused", "baseline")  # a run's final model: the fused stage's, else the baseline's


def checkpoint_folder(path: str | Path) -> Path:
    """A run directory -> the checkpoint folder of its final stage; a checkpoint folder as it is."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    for stage in STAGES:
        if (path / "checkpoints" / stage).is_dir():
            return path / "checkpoints" / stage
    return path


def _position(path: Path) -> tuple[int, int] | None:
    """(step, epoch) of a checkpoint, read without loading its tensors (mmap); None if unreadable."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file among the candidates
        log.warning("skipping %s: cannot be read (%s)", path, type(e).__name__)
        return None
    if not isinstance(ck, dict) or "model" not in ck or ck.get("format_version") != FORMAT_VERSION:
        return None
    if (ck.get("meta") or {}).get("averaged_from"):
        return None  # an average is not itself a training checkpoint
    return int(ck.get("step", 0)), int(ck.get("epoch", 0))


def last_checkpoints(folder: str | Path, n: int) -> list[Path]:
    """The ``n`` checkpoints of a run (or checkpoint folder) with the highest steps, oldest first.

    Files are ordered by the step stored in them, whatever their names; copies of one step
    (``checkpoint_best.pt`` and ``checkpoint_last.pt`` written together) count once.
    """
    if n < 1:
        raise CheckpointError(f"cannot average the last {n} checkpoints")
    folder = checkpoint_folder(folder)
    by_step: dict[int, tuple[tuple[int, int], Path]] = {}
    for path in sorted(folder.glob("*.pt")):
        pos = _position(path)
        if pos is not None and pos[0] not in by_step:
            by_step[pos[0]] = (pos, path)
    ordered = [p for _, p in sorted(by_step.values())]
    if len(ordered) < n:
        steps = ", ".join(str(s) for s in sorted(by_step)) or "none"
        raise CheckpointError(f"{folder} has {len(ordered)} checkpoints of distinct steps ({steps}); asked for the last {n}")
    return ordered[-n:]


def _check_same_model(path: Path, meta: dict[str, Any], first: Path, first_meta: dict[str, Any]) -> None:
    """Checkpoints of another vocabulary, model config or pretrained encoder cannot be averaged, even
    when every tensor has the same shape: their weights mean different things."""
    a, b = meta.get("vocab_sha256"), first_meta.get("vocab_sha256")
    if a != b:
        raise CheckpointError(f"{path} was trained with another vocabulary than {first} (SentencePiece sha256 "
                              f"{str(a)[:12]} vs {str(b)[:12]}); cannot average")
    ma, mb = meta.get("model") or {}, first_meta.get("model") or {}
    for key in sorted(set(ma) | set(mb)):
        if ma.get(key) != mb.get(key):
            raise CheckpointError(f"{path} has model.{key}={ma.get(key)!r}, {first} has {mb.get(key)!r}; "
                                  "checkpoints of different models cannot be averaged")
    ea, eb = (meta.get("encoder") or {}).get("weights_sha256"), (first_meta.get("encoder") or {}).get("weights_sha256")
    if ea != eb:
        raise CheckpointError(f"{path} was trained with another pretrained encoder than {first} (weights sha256 "
                              f"{str(ea)[:12]} vs {str(eb)[:12]}); cannot average")


def average_checkpoints(paths: list[str | Path], out: str | Path) -> Path:
    """Write the average of ``paths`` to ``out``; its epoch, step and meta are the last checkpoint's."""
    if not paths:
        raise CheckpointError("no checkpoints to average")
    paths = [Path(p) for p in paths]
    out = Path(out)
    if any(out.resolve() == p.resolve() for p in paths):
        raise CheckpointError(f"--out {out} is one of the checkpoints to average; write the average to a new file")
    sums: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    last: dict[str, Any] = {}
    steps: list[int] = []
    for i, path in enumerate(paths):
        ckpt = load_checkpoint(path)
        steps.append(int(ckpt.get("step", -1)))
        weights = ckpt["model"]
        if i == 0:
            first, first_meta = weights, ckpt.get("meta") or {}
            sums = {k: v.to(torch.float64) for k, v in weights.items() if v.is_floating_point()}
        else:
            _check_same_model(path, ckpt.get("meta") or {}, paths[0], first_meta)
            if set(weights) != set(first):
                diff = sorted(set(weights) ^ set(first))
                raise CheckpointError(f"{path} holds other tensors than {paths[0]} (e.g. {diff[0]})")
            for k, v in weights.items():
                if v.shape != first[k].shape:
                    raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, {paths[0]} has {tuple(first[k].shape)}")
                if k in sums:
                    sums[k] += v.to(torch.float64)
                elif not torch.equal(v, first[k]):
                    raise CheckpointError(f"{path}: non-float tensor {k} differs from {paths[0]}'s; cannot average")
        last = ckpt
    n = len(paths)
    model = {k: (sums[k] / n).to(first[k].dtype) if k in sums else first[k] for k in first}
    meta = {**(last.get("meta") or {}), "averaged_from": [str(p.resolve()) for p in paths]}
    payload = {"model": model, "epoch": last.get("epoch", 0), "step": last.get("step", 0),
               "metric": float("nan"), "meta": meta}
    save_checkpoint(out, payload)
    log.info("averaged %d checkpoints (steps %s) into %s", n, steps, out)
    return out
