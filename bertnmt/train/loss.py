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
    lp = F.log_softmax(logits.float().view(-1, logits.size(-1)), dim=-1)  # (N, V)
    target = target.reshape(-1, 1)  # (N, 1)
    keep = target.squeeze(1).ne(pad_id).to(lp.dtype)  # (N,) a multiplicative mask: boolean indexing would sync
    loss, nll = _sums(lp, target, keep, eps)
    return loss, nll.detach()


def _sums(lp: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, NLL) summed over rows: ``lp`` (n, V) log-probabilities, ``target`` (n, 1), ``keep`` (n,)."""
    nll = -(lp.gather(1, target).squeeze(1) * keep).sum()
    loss = nll if eps == 0 else (1.0 - eps) * nll - (eps / lp.size(-1)) * (lp.sum(-1) * keep).sum()
    return loss, nll


def forward_loss(model: nn.Module, batch: Batch, pad_id: int, eps: float, device: torch.device,
                 use_features: bool = True, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward: (summed smoothed loss, summed NLL) of a batch, as 0-dim device tensors.

    The cached H_B in ``batch.bert_feats`` is used when present and ``use_features``. The output layer
    runs only at the positions of ``batch.out_idx`` (the non-pad targets, found on the host, padded to a
    fixed multiple: a fixed-size gather), else at every position; padding is masked in the loss by
    multiplication. Selecting positions with a boolean mask would make the host wait for the device.
    The output layer and the loss run together, chunk by chunk (:func:`linear_smoothed_loss`)."""
    bert_features = None
    if batch.bert_feats is not None and use_features:
        bert_features = (batch.bert_feats.float(), batch.bert_mask.eq(0))  # (B, E, Hb), (B, E)
    with autocast(device, precision):
        x = model(batch.src, batch.tgt_in, batch.bert_ids, batch.bert_mask, bert_features,
                  keep=batch.out_idx, features_only=True)  # (N', C), or (B, T, C)
        weight = getattr(model, "module", model).output_weight  # (V, C); through a DDP wrapper too
        target = batch.tgt_out if batch.out_idx is None else batch.out_tgt  # (B, T) or (N',)
        return linear_smoothed_loss(x, weight, target, pad_id, eps)


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits per chunk: about 4 MB of fp32 on the CPU (they stay in the cache between the
    forward and its gradient), 256 MB on a GPU (few launches; the memory of full logits is still saved)."""
    return max(1, (2**20 if device.type == "cpu" else 2**26) // vocab)


class _LinearSmoothedLoss(torch.autograd.Function):
    """The output layer and the smoothed loss in one: its gradient is computed in the forward, chunk by chunk.

    The gradient of the loss with respect to the logits is known in closed form (softmax minus the smoothed
    one-hot target), so the (N, V) logits, log-probabilities and their gradients never exist at once: each
    chunk's are made, used for the loss and for the gradients of ``x`` and ``weight``, and dropped. The
    backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                eps: float, rows: int, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = x.size(0), weight.size(0)
        need_x = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        gx = torch.empty_like(x) if need_x else None  # (N, C)
        gw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, C)
        loss = nll = x.new_zeros((), dtype=torch.float32)
        for s in range(0, N, rows):
            xs, t, k = x[s:s + rows], target[s:s + rows, None], keep[s:s + rows]  # (n, C), (n, 1), (n,)
            lp = F.log_softmax(F.linear(xs, weight).float(), dim=-1)  # (n, V)
            chunk_loss, chunk_nll = _sums(lp, t, k, eps)
            loss, nll = loss + chunk_loss, nll + chunk_nll
            if not (need_x or need_w):
                continue
            g = lp.exp_()  # (n, V) softmax; d loss / d logits = k * (softmax - (1 - eps) onehot - eps / V)
            if eps:
                g.sub_(eps / V)
            g.scatter_add_(1, t, g.new_full(t.shape, eps - 1.0))
            g.mul_(k[:, None])
            if need_x:
                gx[s:s + rows] = torch.mm(g.to(weight.dtype), weight)  # (n, C)
            if need_w:
                gw.add_(torch.mm(g.t().to(xs.dtype), xs))  # (V, C)
        ctx.save_for_backward(gx, gw)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, _g_nll: torch.Tensor):
        gx, gw = ctx.saved_tensors
        return (None if gx is None else gx * g_loss, None if gw is None else (gw * g_loss).to(ctx.weight_dtype),
                None, None, None, None, None)


def linear_smoothed_loss(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, pad_id: int,
                         eps: float, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`smoothed_loss` of the logits ``x @ weight.T``, without making the (N, V) logits at once.

    ``x`` (..., C) hidden states, ``weight`` (V, C) the output layer, ``target`` (...) with pad_id at padding.
    Equal to ``smoothed_loss(F.linear(x, weight), target, pad_id, eps)``, with the gradients of ``x`` and
    ``weight``; ``rows`` logits rows per chunk (default :func:`chunk_rows`)."""
    x = x.reshape(-1, x.size(-1))  # (N, C)
    target = target.reshape(-1)  # (N,)
    keep = target.ne(pad_id).to(torch.float32)  # (N,) a multiplicative mask: no host sync
    rows = rows or chunk_rows(weight.size(0), x.device)
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearSmoothedLoss.apply(x, weight, target, keep, eps, rows, want_grad)


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
