"""Token-budget batching: bucket sentences by length, cut batches within ``max_tokens``.

The cost of a batch is ``n_sentences * width``, where a sentence's width is
``max(src_len + 1, tgt_len + 1, enc_len)`` (+1 for the eos / bos the collater adds; encoder
lengths already include their special tokens) and the batch width is its widest sentence.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from bertnmt.core.errors import ConfigError

_U64 = (1 << 64) - 1


class TokenBatchSampler(Sampler[list[int]]):
    """Yields lists of split indices; the same (seed, epoch) always gives the same batches.

    ``shuffle=True``: length ties are broken by a permutation drawn from (seed, epoch) and the
    batch order is shuffled with the same generator. ``shuffle=False``: batches in length order.
    A single sentence wider than ``max_tokens`` forms a batch of its own. ``set_epoch(epoch, skip=k)``
    leaves out the epoch's first ``k`` batches (a resumed epoch continues with the same remaining batches).

    Data-parallel training (:meth:`set_shard`): every rank builds the same epoch's batch list and
    rank r takes batches r, r+N, r+2N, ...; the last ``len % N`` batches of the epoch are dropped
    (a different few each epoch), so every rank has the same number of batches and N ranks with
    ``accum_steps=a`` make exactly the updates of one process with ``accum_steps=a*N``.
    """

    def __init__(
        self,
        src_lens: Sequence[int],
        tgt_lens: Sequence[int],
        enc_lens: Sequence[int] | None = None,
        max_tokens: int = 4096,
        seed: int = 1,
        shuffle: bool = True,
    ):
        if max_tokens < 1:
            raise ConfigError(f"data.max_tokens={max_tokens} must be positive")
        src = np.asarray(src_lens, dtype=np.int64)
        tgt = np.asarray(tgt_lens, dtype=np.int64)
        if src.shape != tgt.shape:
            raise ValueError(f"{len(src)} source lengths but {len(tgt)} target lengths")
        widths = np.maximum(src + 1, tgt + 1)
        if enc_lens is not None:
            enc = np.asarray(enc_lens, dtype=np.int64)
            if enc.shape != src.shape:
                raise ValueError(f"{len(src)} source lengths but {len(enc)} encoder lengths")
            widths = np.maximum(widths, enc)
        self.widths = widths  # (N,)
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip = 0  # batches of the epoch already consumed (a resumed epoch)
        self.rank, self.world_size = 0, 1
        self._batches: list[list[int]] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the (deterministic) order of epoch ``epoch``; iteration starts after its first ``skip`` batches."""
        if skip < 0:
            raise ValueError(f"skip={skip} must be >= 0")
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches = None
        self.skip = skip

    def set_shard(self, rank: int, world_size: int) -> None:
        """Yield only rank ``rank``'s share of each epoch's batches (of ``world_size`` ranks)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self._batches = None

    def all_batches(self) -> list[list[int]]:
        """Every batch of the current epoch, whatever the shard."""
        return self._make_batches()

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch (all of them in one process; computed once per epoch)."""
        if self._batches is None:
            batches = self._make_batches()
            if self.world_size > 1:
                if len(batches) < self.world_size:
                    raise ConfigError(f"the training split makes {len(batches)} batches of data.max_tokens={self.max_tokens} "
                                      f"for {self.world_size} processes; lower data.max_tokens or use fewer processes")
                usable = len(batches) - len(batches) % self.world_size  # drop the remainder: equal counts
                batches = batches[self.rank:usable:self.world_size]
            self._batches = batches
        return self._batches

    def _make_batches(self) -> list[list[int]]:
        n = len(self.widths)
        rng = np.random.default_rng([self.seed & _U64, self.epoch & _U64])  # any ints, incl. negative
        tiebreak = rng.permutation(n) if self.shuffle else np.arange(n)
        order = tiebreak[np.argsort(self.widths[tiebreak], kind="stable")]
        batches: list[list[int]] = []
        current: list[int] = []
        width = 0
        for i, w in zip(order.tolist(), self.widths[order].tolist()):
            # ascending widths: adding i makes the batch width w
            if current and (len(current) + 1) * max(width, w) > self.max_tokens:
                batches.append(current)
                current, width = [], 0
            current.append(i)
            width = max(width, w)
        if current:
            batches.append(current)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.skip :])

    def __len__(self) -> int:
        """The number of batches an iteration yields (the epoch's, less the skipped ones)."""
        return max(0, len(self.batches()) - self.skip)
