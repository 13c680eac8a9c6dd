"""``PairDataset``, the padded ``Batch`` and ``make_loader`` (a DataLoader with token-budget batches)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from bertnmt.data.batching import TokenBatchSampler
from bertnmt.data.features import FeatureStore, pad_features
from bertnmt.data.prepare import Split
from bertnmt.data.tokenize import SubwordVocab

# (index, src ids, tgt ids, enc ids or None, cached H_B (E, Hb) or None)
Sample = tuple[int, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


class PairDataset(Dataset):
    """Items of one split: ``(index, src_ids, tgt_ids, bert_ids or None, features or None)``.

    ``features`` (the frozen encoder's cached H_B, see :mod:`bertnmt.data.features`) can be switched
    off at any time by setting the attribute to None: the trainer does so when the encoder starts to train.
    """

    def __init__(self, split: Split, with_encoder: bool = True, features: FeatureStore | None = None):
        self.split = split
        self.with_encoder = with_encoder and split.bert_ids is not None
        self.features = features if self.with_encoder else None
        # a split cut to its first n sentences (decoding.head) keeps using the whole split's features
        if self.features is not None and len(self.features) < len(split.src_ids):
            raise ValueError(f"{len(self.features)} cached feature rows for {len(split.src_ids)} sentences")

    def __len__(self) -> int:
        return len(self.split.src_ids)

    def __getitem__(self, i: int) -> Sample:
        enc = self.split.bert_ids[i] if self.with_encoder else None
        feats = self.features.get(i) if self.features is not None else None
        return i, self.split.src_ids[i], self.split.tgt_ids[i], enc, feats


@dataclass
class Batch:
    src: Tensor  # (B, S) long, SentencePiece ids + eos, right-padded with pad_id
    tgt_in: Tensor  # (B, T) long, bos + ids, right-padded
    tgt_out: Tensor  # (B, T) long, ids + eos, right-padded
    bert_ids: Tensor | None  # (B, E) long, encoder ids, right-padded with the encoder's pad id
    bert_mask: Tensor | None  # (B, E) long, 1 = real token (HF attention_mask convention)
    bert_feats: Tensor | None  # (B, E, Hb) fp16 cached H_B, zero at padding; None = compute it live
    indices: Tensor  # (B,) positions of these sentences in the split
    ntokens: int  # non-pad target tokens (tgt_out != pad)
    # the output layer's positions, found on the host so that selecting them on the device is a fixed-size
    # gather: flat indexes (row * T + t) of the non-pad targets, padded with 0 to a multiple of 64 (N',)
    out_idx: Tensor | None = None
    out_tgt: Tensor | None = None  # (N',) long, their targets; pad_id at the padding (masked in the loss)

    def __len__(self) -> int:
        return self.src.size(0)

    def _map(self, fn: Any) -> Batch:
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return Batch(
            src=fn(self.src),
            tgt_in=fn(self.tgt_in),
            tgt_out=fn(self.tgt_out),
            bert_ids=opt(self.bert_ids),
            bert_mask=opt(self.bert_mask),
            bert_feats=opt(self.bert_feats),
            indices=fn(self.indices),
            ntokens=self.ntokens,
            out_idx=opt(self.out_idx),
            out_tgt=opt(self.out_tgt),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())


OUT_MULTIPLE = 64  # output-layer positions are padded to a multiple of this (few distinct shapes)


def _pad(seqs: list[np.ndarray], pad_id: int, prefix: int | None = None, suffix: int | None = None,
         multiple: int = 1) -> Tensor:
    """Right-padded (B, L) long tensor of ``[prefix] + seq + [suffix]``, L rounded up to a multiple of ``multiple``."""
    extra = (prefix is not None) + (suffix is not None)
    width = max(len(s) for s in seqs) + extra
    width = -(-width // multiple) * multiple
    out = np.full((len(seqs), width), pad_id, dtype=np.int64)  # (B, L)
    start = 1 if prefix is not None else 0
    for row, seq in enumerate(seqs):
        if prefix is not None:
            out[row, 0] = prefix
        out[row, start : start + len(seq)] = seq
        if suffix is not None:
            out[row, start + len(seq)] = suffix
    return torch.from_numpy(out)


def collate(
    samples: list[Sample],
    bert_pad_id: int | None = None,
    pad_id: int = SubwordVocab.pad_id,
    bos_id: int = SubwordVocab.bos_id,
    eos_id: int = SubwordVocab.eos_id,
    pad_multiple: int = 1,
) -> Batch:
    """Pad a list of samples into a :class:`Batch` (encoder fields None without encoder ids).

    ``pad_multiple``: every length (S, T, E) is rounded up to a multiple of it, so that a training run sees
    a few distinct shapes (what ``torch.compile`` and CUDA graphs need) at the cost of some padding."""
    m = max(1, pad_multiple)
    indices, src, tgt, enc, feats = zip(*samples, strict=True)
    tgt_out = _pad(list(tgt), pad_id, suffix=eos_id, multiple=m)  # (B, T)
    bert_ids = bert_mask = None
    if enc[0] is not None:
        if bert_pad_id is None:
            raise ValueError("samples carry encoder ids: pass bert_pad_id")
        bert_ids = _pad(list(enc), bert_pad_id, multiple=m)  # (B, E)
        lengths = torch.tensor([len(e) for e in enc])  # (B,)
        bert_mask = (torch.arange(bert_ids.size(1))[None, :] < lengths[:, None]).long()  # (B, E)
    bert_feats = None
    if bert_ids is not None and feats[0] is not None:
        bert_feats = pad_features(list(feats), bert_ids.size(1))  # (B, E, Hb)
    flat = tgt_out.view(-1).numpy()  # (B * T,)
    idx = np.flatnonzero(flat != pad_id)  # (N,) on the host, from the collated arrays
    n_out = -(-len(idx) // OUT_MULTIPLE) * OUT_MULTIPLE if m > 1 else len(idx)
    out_idx = np.zeros(n_out, dtype=np.int64)  # (N',)
    out_idx[: len(idx)] = idx
    out_tgt = np.full(n_out, pad_id, dtype=np.int64)  # (N',)
    out_tgt[: len(idx)] = flat[idx]
    return Batch(
        src=_pad(list(src), pad_id, suffix=eos_id, multiple=m),  # (B, S)
        tgt_in=_pad(list(tgt), pad_id, prefix=bos_id, multiple=m),  # (B, T)
        tgt_out=tgt_out,
        bert_ids=bert_ids,
        bert_mask=bert_mask,
        bert_feats=bert_feats,
        indices=torch.tensor(indices, dtype=torch.long),  # (B,)
        ntokens=len(idx),
        out_idx=torch.from_numpy(out_idx),
        out_tgt=torch.from_numpy(out_tgt),
    )


def make_loader(
    split: Split,
    max_tokens: int,
    seed: int,
    shuffle: bool,
    bert_pad_id: int | None,
    pin_memory: bool = False,
    features: FeatureStore | None = None,
    pad_multiple: int = 1,
) -> DataLoader:
    """DataLoader of :class:`Batch` with a :class:`TokenBatchSampler` as ``loader.batch_sampler``.

    The encoder view is used when the split has ``bert_ids`` and ``bert_pad_id`` is given;
    ``bert_pad_id=None`` leaves it out (enc fields None, budget from source/target only).
    ``features``: the split's cached H_B, served as ``Batch.bert_feats`` (``loader.dataset.features = None``
    switches it off). ``pad_multiple``: see :func:`collate`.
    """
    with_encoder = split.bert_ids is not None and bert_pad_id is not None
    sampler = TokenBatchSampler(
        src_lens=[len(s) for s in split.src_ids],
        tgt_lens=[len(t) for t in split.tgt_ids],
        bert_lens=[len(e) for e in split.bert_ids] if with_encoder else None,
        max_tokens=max_tokens,
        seed=seed,
        shuffle=shuffle,
    )
    return DataLoader(
        PairDataset(split, with_encoder=with_encoder, features=features),
        batch_sampler=sampler,
        collate_fn=partial(collate, bert_pad_id=bert_pad_id, pad_multiple=pad_multiple),
        num_workers=0,
        pin_memory=pin_memory,
    )
