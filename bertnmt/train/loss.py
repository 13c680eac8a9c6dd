"""The training loss: label-smoothed cross entropy (paper section 5, fairseq's ``label_smoothed_cross_entropy``)
and the training forward that produces it without making the host wait for the device."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertnmt.core.config import CompileMode
from bertnmt.core.devices import autocast
from bertnmt.data.collate import Batch


def smoothed_loss(logits: torch.Tensor, target: torch.Tensor, pad_id: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross entropy and summed NLL over non-pad tokens.

    ``logits`` (B, T, V) with ``target`` (B, T), or (N, V) with (N,). Equal to
    ``F.cross_entropy(..., label_smoothing=eps, ignore_index=pad_id, reduction="sum")`` and its
    NLL, from one log-softmax instead of two: (1 - eps) * nll + eps / V * sum_c -log p_c.
    """
    V = logits.size(-1)
    lp = F.log_softmax(logits.float().view(-1, V), dim=-1)  # (N, V)
    target = target.reshape(-1)  # (N,)
    keep = target.ne(pad_id).to(lp.dtype)  # (N,) a multiplicative mask: no host sync (boolean indexing would)
    nll = -(lp.gather(1, target.unsqueeze(1)).squeeze(1) * keep).sum()
    loss = nll if eps == 0 else (1.0 - eps) * nll - (eps / V) * (lp.sum(-1) * keep).sum()
    return loss, nll.detach()


def forward_loss(model: nn.Module, batch: Batch, pad_id: int, eps: float, device: torch.device,
                 use_features: bool = True, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward: (summed smoothed loss, summed NLL) of a batch, as 0-dim device tensors.

    The cached H_B in ``batch.bert_feats`` is used when present and ``use_features``. The output layer
    runs only at the positions of ``batch.out_idx`` (the non-pad targets, found on the host, padded to a
    fixed multiple: a fixed-size gather), else at every position; padding is masked in the loss by
    multiplication. Selecting positions with a boolean mask would make the host wait for the device."""
    bert_features = None
    if batch.bert_feats is not None and use_features:
        bert_features = (batch.bert_feats.float(), batch.bert_mask.eq(0))  # (B, E, Hb), (B, E)
    with autocast(device, precision):
        logits = model(batch.src, batch.tgt_in, batch.bert_ids, batch.bert_mask, bert_features,
                       keep=batch.out_idx)  # (N', V), or (B, T, V)
    target = batch.tgt_out if batch.out_idx is None else batch.out_tgt  # (B, T) or (N',)
    return smoothed_loss(logits, target, pad_id, eps)


def compile_loss(mode: CompileMode | str = CompileMode.default, backend: str | None = None) -> Callable[..., Any]:
    """:func:`forward_loss` compiled as one graph (``fullgraph=True``: a graph break is an error).

    Its backward is compiled by AOTAutograd, so a whole update is the two graphs and the fused optimizer
    (one kernel per parameter group). The optimizer is not compiled: ``torch.optim`` breaks the graph around
    every ``step`` on purpose, and its fused kernel leaves nothing to fuse. A new batch shape compiles anew;
    batch lengths are padded to few shapes (``data.pad_multiple``) and the recompile limit is raised to match."""
    mode = CompileMode.parse(mode, "trainer.compile_mode")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    kw = {"backend": backend} if backend else {}  # torch's default: inductor
    return torch.compile(forward_loss, fullgraph=True, mode=None if mode == CompileMode.default else mode.torch_mode,
                         **kw)
