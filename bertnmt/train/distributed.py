"""Data-parallel training on several processes (``torchrun --nproc_per_node=N scripts/train.py ...``).

Everything that knows about ``torch.distributed`` is here; the trainer and the pipeline call it
through a few marked lines and behave exactly as before in a single process.

- :func:`setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and opens the process
  group: NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. Without torchrun, or with
  WORLD_SIZE=1, it does nothing and every helper below is a no-op.
- Rank 0 alone writes the run's files (``checkpoint.save_checkpoint``, ``training.append_jsonl``,
  ``pipeline.write_json``, TensorBoard, the export, the test decode) and prepares shared caches first
  (:func:`main_first`); the other ranks log warnings only.
- :func:`shard` gives rank r the training batches r, r+N, r+2N, ... of the epoch's batch list, which
  every rank builds identically from (seed, epoch); the last ``len % N`` batches are dropped, so every
  rank runs the same number of updates (see :class:`~bertnmt.data.batching.TokenBatchSampler`).
- :class:`Replicas` wraps the model in ``DistributedDataParallel`` for training forwards and wraps it
  again whenever the set of trainable parameters changes (DDP fixes that set at construction, so a
  freeze switch needs a new wrapper; frozen parameters are simply not in it).
- :func:`loss_denominator`: the loss of an update is divided by its target tokens summed over all ranks,
  times 1/N because DDP averages the gradients: N processes with 1/N of the batch each take the same
  step as one process with the whole batch.
- Drop-net (paper section 4) draws from its own generator, seeded identically on every rank
  (:func:`bertnmt.model.fusion.seed_drop_net`), so every rank keeps or skips the same branch in every
  layer, as in the official implementation (one draw per layer per forward, the same on every GPU).
  A skipped branch leaves parameters without a gradient, which DDP accepts only with
  ``find_unused_parameters=True``; it is switched on for models with drop-net.
"""
from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertnmt.core.errors import ConfigError

log = logging.getLogger(__name__)

_OWNED = False  # True when setup() opened the process group (and so closes it at exit)


# -- the process group --------------------------------------------------------------------------
def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs at INFO."""
    return rank() == 0


def setup(device: str = "auto", timeout_min: int = 60) -> bool:
    """Open the process group from torchrun's environment; True when running distributed.

    Idempotent; a no-op without torchrun (or with WORLD_SIZE=1) or when a group is already open
    (a test that opened its own). ``device`` is ``trainer.device``: CUDA ranks use NCCL and
    ``cuda:LOCAL_RANK``, CPU ranks gloo. ``timeout_min`` bounds every wait, e.g. for rank 0's data
    preparation or test decode.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        _quiet_others()
        return active()
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    want = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))
    if want.type == "cuda":
        if want.index is not None:
            raise ConfigError(f"trainer.device={device!r}: under torchrun each rank uses cuda:LOCAL_RANK; use cuda or auto")
        if local_rank() >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank()} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank())  # torch.device("cuda") now means this rank's GPU
    backend = "nccl" if want.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min))
    _OWNED = True
    atexit.register(teardown)
    _quiet_others()
    log.info("distributed: %d processes, backend %s, rank 0 writes the run's files", world_size(), backend)
    return True


def teardown() -> None:
    """Close the process group opened by :func:`setup` (registered at exit)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def _quiet_others() -> None:
    """Ranks other than 0 log warnings and errors only (their INFO lines would repeat rank 0's)."""
    if not is_main():
        logging.getLogger("bertnmt").setLevel(logging.WARNING)


def hydra_argv(argv: list[str]) -> list[str]:
    """Command-line overrides for a rank other than 0 under torchrun, before Hydra starts: no run
    folder of its own (``hydra.run.dir=.``, no ``.hydra/``, no ``train.log``; rank 0's folder is
    shared through :func:`broadcast`). Rank 0 and single processes get ``argv`` unchanged."""
    if env_world_size() <= 1 or env_rank() == 0:
        return argv
    return [*argv, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


# -- collectives (no-ops in a single process) ----------------------------------------------------
def _barrier_kwargs() -> dict[str, Any]:
    return {"device_ids": [torch.cuda.current_device()]} if dist.get_backend() == "nccl" else {}


def barrier() -> None:
    if active():
        dist.barrier(**_barrier_kwargs())


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others then run it (and read that cache)."""
    if not active():
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def loss_denominator(ntokens: int, device: torch.device) -> int | torch.Tensor:
    """What an update's summed loss is divided by on this rank: its target tokens in one process;
    under DDP the tokens of the whole update (all ranks) / N, since DDP averages the N gradients.
    A 0-dim float32 tensor on ``device`` then (no host sync)."""
    if not active():
        return ntokens
    total = torch.tensor(float(ntokens), device=device)
    dist.all_reduce(total)
    return total / world_size()


def sum_over_ranks(loss_sum: torch.Tensor, ntokens: int) -> tuple[torch.Tensor, int]:
    """An epoch's summed loss and target tokens over all ranks (each rank's own in one process)."""
    if not active():
        return loss_sum, ntokens
    both = torch.stack([loss_sum.detach().double(), torch.tensor(float(ntokens), dtype=torch.float64,
                                                                  device=loss_sum.device)])  # (2,)
    dist.all_reduce(both)
    return both[0].to(loss_sum.dtype), int(both[1].item())


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; ``flag`` itself in one process)."""
    if not active():
        return flag
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """Whether a 0-dim bool device tensor is True on any rank (an all-reduce on the device; no host sync)."""
    if not active():
        return flag
    device = flag.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = flag.to(device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(flag.device).bool()


# -- data and model ------------------------------------------------------------------------------
def shard(sampler: Any) -> None:
    """Give this rank its share of a :class:`~bertnmt.data.batching.TokenBatchSampler`'s batches."""
    if active():
        sampler.set_shard(rank(), world_size())


def drops_branches(model: nn.Module) -> bool:
    """Whether a training forward can skip a branch (drop-net > 0 in a fused layer): its parameters then get no gradient."""
    return any(getattr(m, "bert_attn", None) is not None and getattr(m, "drop_net", 0.0) > 0 for m in model.modules())


class Replicas:
    """The model as trained on every rank: ``DistributedDataParallel`` over its trainable parameters.

    :meth:`forward_model` returns the wrapper for a training forward (the plain model in one process,
    in eval mode or without gradients: validation and decoding never synchronise). The wrapper is
    built on first use and rebuilt when ``requires_grad`` changed since (a freeze switch; every rank
    switches at the same update). ``wraps`` counts the wrappers built. :meth:`begin_update` announces
    an update's micro-batches: the gradients are all-reduced once, in the backward of the last one.
    """

    def __init__(self, model: nn.Module, device: torch.device, seed: int) -> None:
        self.model, self.device = model, device
        self.ddp: DistributedDataParallel | None = None
        self.trainable: tuple[bool, ...] = ()
        self.find_unused = drops_branches(model)
        self.wraps = 0
        self.pending = 0  # training forwards left in the current update
        if active():
            from bertnmt.model.fusion import seed_drop_net

            seed_drop_net(seed)  # the same drop-net draws on every rank

    def _trainable(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def begin_update(self, ntokens: int, micro_batches: int) -> int | torch.Tensor:
        """Start an update of ``micro_batches`` forwards with ``ntokens`` target tokens on this rank;
        returns what their summed losses are divided by (:func:`loss_denominator`)."""
        self.pending = micro_batches
        return loss_denominator(ntokens, self.device)

    def forward_model(self) -> nn.Module:
        """The module to call for this forward. Under DDP, the forwards of an update before its last
        one (see :meth:`begin_update`) accumulate gradients locally (``no_sync``); any other all-reduces."""
        if not active() or not self.model.training or not torch.is_grad_enabled():
            return self.model
        self.pending -= 1
        sync = self.pending <= 0
        trainable = self._trainable()
        if self.ddp is None or trainable != self.trainable:
            self.rewrap(trainable)
        if self.ddp is None:  # nothing trains
            return self.model
        self.ddp.require_backward_grad_sync = sync  # what DDP.no_sync() sets
        return self.ddp

    def reset(self) -> None:
        """Drop the wrapper (rebuilt at the next forward): after a forward whose backward was skipped."""
        if self.ddp is not None:
            self.rewrap()

    def rewrap(self, trainable: tuple[bool, ...] | None = None) -> None:
        """(Re)build the wrapper over the currently trainable parameters; the old one's hooks are removed."""
        if self.ddp is not None:
            self.ddp._remove_autograd_hooks()  # its reducer must not see the next backward
            self.ddp = None
        self.trainable = self._trainable() if trainable is None else trainable
        if not any(self.trainable):
            return
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False,
                                           find_unused_parameters=self.find_unused)
        self.wraps += 1
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("DDP wrapper %d over %s trainable parameters (find_unused_parameters=%s)", self.wraps, f"{n:,}",
                 self.find_unused)
