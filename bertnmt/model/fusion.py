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

    Under DDP every rank seeds it identically (:class:`bertnmt.train.distributed.Replicas`), so every rank
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


def drop_net_mix(p_net: float, training: bool, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Drop-net decided on the device (for ``torch.compile(fullgraph=True)``): the same three outcomes with
    the same probabilities as :func:`drop_net_weights`, as 0-dim tensors from torch's RNG on ``like``'s device.
    Both branches are then always computed (a dropped one is multiplied by 0 and gets a zero gradient), so
    there is no data-dependent branch; under DDP the draws are each rank's own, like dropout masks."""
    if not training or p_net <= 0.0:
        return 0.5, 0.5
    u = torch.rand((), device=like.device)  # ()
    w1 = torch.where(u < p_net / 2, 1.0, torch.where(u > 1.0 - p_net / 2, 0.0, 0.5)).to(like.dtype)
    return w1, 1.0 - w1


def runs(weight: torch.Tensor | float) -> bool:
    """Whether a drop-net branch must be computed: always for a device-side weight, else when not 0."""
    return isinstance(weight, torch.Tensor) or weight != 0.0


def set_drop_net_on_device(model: nn.Module, on: bool) -> None:
    """Switch every fused layer of ``model`` to :func:`drop_net_mix` (True) or host-side draws (False)."""
    for m in model.modules():
        if hasattr(m, "drop_net_on_device"):
            m.drop_net_on_device = on
