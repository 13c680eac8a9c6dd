"""What the training loop does when something goes wrong at a step.

- :class:`StopSignal`: SIGTERM / SIGINT (cluster pre-emption, Ctrl-C) only set a flag; the trainer
  saves a checkpoint at the next step boundary and raises :class:`~bertnmt.core.errors.TrainingInterrupted`.
  A second signal stops at once (``KeyboardInterrupt``), without saving.
- :class:`UpdateGuard`: a non-finite loss (or gradient norm) skips the update on the device — the fused
  optimizer's ``found_inf`` leaves weights and optimizer state untouched, while the step count and
  schedule advance — and is counted there; the counts are read once per log interval, and
  ``max_nonfinite_in_row`` of them in a row is then a :class:`~bertnmt.core.errors.TrainingError` naming the step. A CUDA out-of-memory error on a batch frees
  the gradients and the allocator's cache, skips the batch and is counted (as fairseq does).
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch

from bertnmt.core.errors import TrainingError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """A context manager that turns SIGTERM / SIGINT into a flag polled at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum  # nothing else here: a handler may run in the middle of any Python code

    def __enter__(self) -> "StopSignal":
        self.signum = None
        if threading.current_thread() is threading.main_thread():  # signal.signal only works there
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class UpdateGuard:
    """Counts skipped updates (per epoch) and stops after too many non-finite losses in a row."""

    def __init__(self, stage: str, max_nonfinite_in_row: int) -> None:
        self.stage = stage
        self.max_in_row = max_nonfinite_in_row
        self.nonfinite = 0  # this epoch
        self.oom = 0  # this epoch
        self.in_row = 0  # non-finite losses since the last good update
        self._dev: torch.Tensor | None = None  # the same, counted on the device during updates (track / settle)

    def state_dict(self) -> dict[str, int]:
        return {"skipped_nonfinite": self.nonfinite, "skipped_oom": self.oom, "nonfinite_in_row": self.in_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite = int(state.get("skipped_nonfinite", 0))
        self.oom = int(state.get("skipped_oom", 0))
        self.in_row = int(state.get("nonfinite_in_row", 0))

    def new_epoch(self) -> None:
        self.nonfinite = self.oom = 0

    def start_counting(self, device: torch.device) -> None:
        """Count the coming updates on ``device``, from the host's counts (call outside an update: this copies)."""
        self._dev = torch.tensor([self.nonfinite, self.in_row, -1], dtype=torch.float64, device=device)

    def track(self, bad: torch.Tensor, step: int) -> None:
        """Count update ``step`` on the device, without a host sync; ``bad`` (a 0-dim bool) = it was skipped.

        Keeps (skipped this epoch, non-finite in a row, the step where ``max_in_row`` in a row was first
        reached or -1); :meth:`settle` reads them."""
        d = self._dev
        b = bad.to(d.dtype)
        in_row = (d[1] + 1.0) * b
        stop = d[2]
        if self.max_in_row:
            stop = torch.where((in_row >= self.max_in_row) & (stop < 0), float(step), stop)
        self._dev = torch.stack([d[0] + b, in_row, stop])  # (3,)

    def counters(self) -> torch.Tensor:
        """The device counters of :meth:`track`, (3,) float64."""
        return self._dev

    def settle(self, counts: list[float], epoch: int, step: int) -> None:
        """Take the device counts read by the trainer (one host read per log interval): log the skipped updates;
        raise once ``max_in_row`` non-finite updates came in a row."""
        skipped, in_row, stop = int(counts[0]), int(counts[1]), int(counts[2])
        new, self.nonfinite, self.in_row = skipped - self.nonfinite, skipped, in_row
        if new:
            log.warning("[%s] epoch %d: %d update(s) skipped for a non-finite loss or gradient norm by step %d "
                        "(%d this epoch, %d in a row now)", self.stage, epoch, new, step, skipped, in_row)
        if stop >= 0:
            raise TrainingError(
                f"{self.max_in_row} non-finite losses in a row, the last at step {stop} (epoch {epoch}, stage {self.stage}); "
                "lower optim.lr, set optim.clip_norm, or raise trainer.max_nonfinite_in_row"
            )

    def skip_oom(self, epoch: int, step: int, ntokens: int, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        """Free what the failed batch left behind and count it (call outside the ``except`` block)."""
        self.oom += 1
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("[%s] epoch %d step %d: out of memory on a batch of %d target tokens; batch skipped "
                    "(%d this epoch; lower data.max_tokens if this repeats)", self.stage, epoch, step, ntokens, self.oom)
