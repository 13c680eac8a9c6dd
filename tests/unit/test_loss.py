"""The output layer and the smoothed loss in one chunked step (bertnmt.train.loss.linear_smoothed_loss): the same
loss, NLL and gradients as the logits followed by smoothed_loss, without ever making the (N, V) logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bertnmt.core.config import ModelConfig
from bertnmt.data.collate import Batch
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.train.loss import chunk_rows, forward_loss, linear_smoothed_loss, smoothed_loss


def inputs(n: int = 37, c: int = 16, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, requires_grad=True)  # (N, C)
    w = torch.randn(v, c, generator=g, requires_grad=True)  # (V, C)
    t = torch.randint(1, v, (n,), generator=g)  # (N,)
    t[:5] = 0  # padding
    return x, w, t


def grads(loss: torch.Tensor, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss * 0.37, ts)  # a non-unit incoming gradient, as (loss / ntokens).backward()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("rows", [1, 7, 37, 1000])
def test_equals_the_logits_then_smoothed_loss(eps: float, rows: int) -> None:
    x, w, t = inputs()
    ref_loss, ref_nll = smoothed_loss(F.linear(x, w), t, 0, eps)
    loss, nll = linear_smoothed_loss(x, w, t, 0, eps, rows=rows)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-4)
    assert loss.requires_grad and not nll.requires_grad
    for got, want in zip(grads(loss, x, w), grads(ref_loss, x, w), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_gradient_work_without_grad_and_none_for_a_frozen_weight() -> None:
    x, w, t = inputs()
    ref, _ = smoothed_loss(F.linear(x, w), t, 0, 0.1)
    with torch.no_grad():
        loss, _ = linear_smoothed_loss(x, w, t, 0, 0.1, rows=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-4)
    frozen = w.detach()  # the output layer frozen: only x gets a gradient
    loss, _ = linear_smoothed_loss(x, frozen, t, 0, 0.1, rows=7)
    (gx,) = grads(loss, x)
    torch.testing.assert_close(gx, grads(smoothed_loss(F.linear(x, frozen), t, 0, 0.1)[0], x)[0])
    assert frozen.grad is None


class LargestOutput(TorchDispatchMode):
    """The largest tensor any ATen op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_the_full_logits_never_exist() -> None:
    x, w, t = inputs(n=64, c=4, v=1000)
    with LargestOutput() as full:
        loss, _ = smoothed_loss(F.linear(x, w), t, 0, 0.1)
        loss.backward()
    with LargestOutput() as chunked:
        loss, _ = linear_smoothed_loss(x, w, t, 0, 0.1, rows=8)
        loss.backward()
    assert full.numel == 64 * 1000
    assert chunked.numel == 8 * 1000  # one chunk of logits (the weight is 1,000 x 4)


def test_chunks_are_a_few_megabytes_on_the_cpu_and_large_on_a_gpu() -> None:
    assert chunk_rows(8000, torch.device("cpu")) == 131  # 4 MB of fp32 logits: they stay in the cache
    assert chunk_rows(8000, torch.device("cuda")) == 8388  # few launches
    assert chunk_rows(2**22, torch.device("cpu")) == 1


def test_bf16_autocast_keeps_the_loss_and_gradients_in_fp32() -> None:
    x, w, t = inputs()
    ref, _ = linear_smoothed_loss(x, w, t, 0, 0.1, rows=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_smoothed_loss(x, w, t, 0, 0.1, rows=7)
    gx, gw = grads(loss, x, w)
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    assert loss.item() != ref.item()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(gw, grads(ref, w)[0], rtol=0.1, atol=1e-2)


@pytest.mark.parametrize("share", [True, False])
def test_the_training_forward_matches_the_models_logits(share: bool) -> None:
    """forward_loss (decoder output, then the chunked output layer and loss) equals the model's logits at the
    kept positions followed by smoothed_loss, in the loss and in every parameter's gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.0, fused=False,
                      share_embeddings=share)
    model = BertFusedTransformer(cfg, 50, 0, None)
    src, tgt_in = torch.randint(4, 50, (3, 7)), torch.randint(4, 50, (3, 6))
    tgt_out = torch.cat([tgt_in[:, 1:], torch.zeros(3, 1, dtype=torch.long)], 1)  # (B, T)
    tgt_out[2, 3:] = 0
    flat = tgt_out.flatten()
    out_idx = torch.cat([flat.ne(0).nonzero().squeeze(1), torch.zeros(3, dtype=torch.long)])  # padded gather
    out_tgt = torch.cat([flat[flat.ne(0)], torch.zeros(3, dtype=torch.long)])
    batch = Batch(src, tgt_in, tgt_out, None, None, None, torch.arange(3), int(flat.ne(0).sum()),
                  out_idx=out_idx, out_tgt=out_tgt)
    params = list(model.parameters())
    loss, nll = forward_loss(model, batch, 0, 0.1, torch.device("cpu"))
    ref, ref_nll = smoothed_loss(model(src, tgt_in)[tgt_out.ne(0)], flat[flat.ne(0)], 0, 0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-4)
    got, want = grads(loss, *params), grads(ref, *params)
    assert len(got) == len(params) and all(g.abs().sum() > 0 for g in got if g.dim() > 1)
    for g1, g2 in zip(got, want, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
