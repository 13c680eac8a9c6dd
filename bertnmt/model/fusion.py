"""The BERT-fused branch and drop-net mixing (paper section 4) — only this."""
from __future__ import annotations

import random

import torch
from torch import nn

from bertnmt.model.layers import MultiheadAttention


class BertAttention(MultiheadAttention):
    """BERT-encoder attention (paper section 4, eqs. 1-2): queries from the NMT layer, keys and
    values from H_B. The key/value input width ``kdim`` is the pretrained encoder's hidden size;
    ``k_proj`` / ``v_proj`` map it to ``d_model`` with no separate projection, as in the official
    code. New modules are Xavier-initialised (paper section 4).
    """

    def __init__(self, d_model: int, heads: int, bert_dim: int, dropout: float = 0.0):
        super().__init__(d_model, heads, kdim=bert_dim, dropout=dropout)

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)


_DROP_NET_RNG: random.Random | None = None  # None: Python's global RNG (one process)


def seed_drop_net(seed: int | None) -> None:
    """Draw drop-net from a generator of its own, seeded with ``seed`` (None: Python's global RNG again).

    Under DDP every rank seeds it identically (:class:`bertnmt.distributed.Replicas`), so every rank
    keeps or skips the same branch in every layer whatever its batch shapes and dropout draws.
    """
    global _DROP_NET_RNG
    _DROP_NET_RNG = None if seed is None else random.Random(seed)


def drop_net_generator() -> random.Random | None:
    """The generator set by :func:`seed_drop_net` (its state goes into checkpoints), or None."""
    return _DROP_NET_RNG


def drop_net_weights(p_net: float, training: bool) -> tuple[float, float]:
    """Drop-net trick (paper section 4): the weights of (first branch, BERT branch).

    In training one uniform ``u`` is drawn per layer per forward call on the host, from Python's
    global RNG (or the generator of :func:`seed_drop_net`, under DDP), never from a tensor, so that
    deciding which branch to run makes the host wait for no device:
    ``u < p/2`` keeps only the first branch (self- or encoder-decoder attention), ``u > 1 - p/2``
    keeps only the BERT branch, otherwise both are averaged. At inference always the average.
    A weight of 0.0 means the caller must skip that branch entirely (no compute, no gradient).
    """
    if not training or p_net <= 0.0:
        return 0.5, 0.5
    u = (_DROP_NET_RNG or random).random()
    if u < p_net / 2:
        return 1.0, 0.0
    if u > 1.0 - p_net / 2:
        return 0.0, 1.0
    return 0.5, 0.5
