"""Early stopping: when a stage stops improving on its validation split (``trainer.early_stop``).

Every decision is a pure function of the stage's epoch records (``results.jsonl`` lines), so a stage
resumed from a checkpoint, which reloads its records, decides exactly as the uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Any

from bertnmt.core.config import EarlyStopConfig
from bertnmt.core.errors import ConfigError


def monitored(rec: dict[str, Any], metric: str) -> float:
    """An epoch record's early-stopping value, higher is better: valid BLEU, or minus the valid loss."""
    return float(rec["valid_bleu"]) if metric == "bleu" else -float(rec["valid_loss"])


def check_early_stop(es: EarlyStopConfig, valid_bleu: bool, valid_bleu_every: int = 1) -> None:
    if es.metric not in ("loss", "bleu"):
        raise ConfigError(f"trainer.early_stop.metric={es.metric!r} is not one of loss, bleu")
    if es.patience < 0 or es.min_delta < 0:
        raise ConfigError(f"trainer.early_stop: patience={es.patience} and min_delta={es.min_delta} must be >= 0")
    if es.patience and es.metric == "bleu" and not valid_bleu:
        raise ConfigError("trainer.early_stop.metric=bleu needs trainer.valid_bleu=true")
    if es.patience and es.metric == "bleu" and valid_bleu_every != 1:
        raise ConfigError(f"trainer.early_stop.metric=bleu needs valid BLEU every epoch, "
                          f"not trainer.valid_bleu_every={valid_bleu_every}")


def best_epoch(epochs: list[dict[str, Any]], es: EarlyStopConfig) -> int | None:
    """The epoch whose validation metric was the best (the first of equals); epochs that did not measure
    it (valid BLEU every few epochs) do not compete. None without such epochs."""
    best: tuple[float, int] | None = None
    for rec in epochs:
        if es.metric == "bleu" and "valid_bleu" not in rec:
            continue
        v = monitored(rec, es.metric)
        if best is None or v > best[0] + es.min_delta:
            best = (v, int(rec["epoch"]))
    return None if best is None else best[1]


def early_stop_epoch(epochs: list[dict[str, Any]], es: EarlyStopConfig) -> int | None:
    """The epoch after which the stage stops early: ``patience`` epochs in a row without an improvement
    of more than ``min_delta`` over the best so far; None while it should go on (or with patience 0).

    A pure function of the epoch records, so a resumed stage (which reloads its records) decides alike."""
    if es.patience <= 0:
        return None
    best, since = -math.inf, 0
    for rec in epochs:
        v = monitored(rec, es.metric)
        if v > best + es.min_delta:
            best, since = v, 0
        else:
            since += 1
            if since >= es.patience:
                return int(rec["epoch"])
    return None
