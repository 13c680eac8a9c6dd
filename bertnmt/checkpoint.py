"""Checkpoints: atomic writes, safe loading, warm start.

A checkpoint is a plain dict of tensors and primitives, loaded with
``torch.load(weights_only=True)`` (nothing is unpickled). A frozen pretrained encoder's
weights are not stored: only its name, path and a hash (``meta["bert"]``).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertnmt import distributed
from bertnmt.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder + rename).

    Under torchrun only rank 0 writes; on the other ranks this does nothing."""
    if not distributed.is_main():  # issue 7b
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; a missing, corrupt or foreign file is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a bertnmt checkpoint")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this bertnmt reads version {FORMAT_VERSION}")
    return ckpt


def model_weights(model: nn.Module, include_bert: bool) -> dict[str, torch.Tensor]:
    """The model's weights, without the pretrained encoder's unless it trains."""
    sd = model.state_dict()
    if not include_bert:
        sd = {k: v for k, v in sd.items() if not k.startswith("bert.")}
    return {k: v.detach().cpu() for k, v in sd.items()}


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load weights saved by :func:`model_weights`; the pretrained encoder may be absent."""
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
    """
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
    bad = [k for k in missing if not (k.startswith("bert.") or ".bert_attn." in k)]
    if bad:
        raise CheckpointError(f"warm-start checkpoint {path} lacks NMT weights: {bad[:3]}")
    new = [k for k in missing if not k.startswith("bert.")]
    log.info("warm start from %s: %d tensors loaded, %d new (BERT attention)", path, len(ckpt["model"]), len(new))
    return new
