"""``trainer.compile=true``: the Trainer trains a torch.compile'd module that shares the model's parameters and
gives the eager losses. Dynamo's graph capture runs for real; the backend is "eager" here, because inductor's
C++ compilation takes minutes on 2 cores and its dropout masks come from another RNG (docs/benchmarks.md)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from bertnmt.core.config import FreezeConfig
from bertnmt.model.fusion import drop_nets, set_drop_net_on_device
from bertnmt.train.loss import forward_loss
from tests.unit.test_features import fake_data, make_trainer


@pytest.mark.slow
def test_compiled_training_matches_eager(bert_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    data = fake_data(tmp_path / "data")
    # the batches compile=true trains on: lengths padded to multiples of 8 (data.pad_multiple auto)
    eager, eager_losses, _ = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "a", 1, True,
                                          pad_multiple=8)
    set_drop_net_on_device(eager.model, True)  # what compile=true uses: drop-net drawn on the device
    eager.fit()
    compiled, compiled_losses, _ = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "b", 1, True,
                                                compile=True)
    assert compiled.loss_fn is not forward_loss and compiled.pad_multiple == eager.pad_multiple == 8
    assert drop_nets(compiled.model) and all(m.on_device for m in drop_nets(compiled.model))
    compiled.fit()
    assert len(compiled_losses) == len(eager_losses) > 2
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    # the compiled module trained the model's own parameters
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)


def test_the_trainers_loss_graph_compiles_whole_with_its_backward(bert_path: str, tmp_path: Path) -> None:  # noqa: F811
    """``trainer.compile``'s graph, ``fullgraph=True``: the fused model's training forward (drop-net on, drawn on
    the device, live encoder) and its loss, on the Trainer's own bucket-padded batches, with AOTAutograd tracing
    the backward ("aot_eager": the graphs inductor would get, run without its C++ build). A graph break or a
    data-dependent shape raises; the loss and every gradient equal eager's."""
    from bertnmt.train.loss import compile_loss

    torch._dynamo.reset()
    data = fake_data(tmp_path / "data")
    trainer, _, _ = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "a", 1, False,
                                 pad_multiple=8)
    model = trainer.model
    set_drop_net_on_device(model, True)
    model.train()
    trainer._sync_policy(1, at_epoch_start=True)
    compiled = compile_loss(backend="aot_eager")
    args = (data.vocab.pad_id, 0.1, trainer.device)
    batches = list(trainer.train_loader)[:2]
    assert all(b.src.size(1) % 8 == 0 and b.tgt_in.size(1) % 8 == 0 for b in batches)
    for b in batches:
        grads = []
        for fn in (forward_loss, compiled):
            torch.manual_seed(7)  # the same dropout and drop-net draws for both
            loss, nll = fn(model, b, *args, use_features=False)
            loss.backward()
            grads.append((loss.detach(), nll, {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
            model.zero_grad(set_to_none=True)
        (le, ne, ge), (lc, nc, gc) = grads
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nc, ne, rtol=1e-5, atol=1e-5)
        assert ge.keys() == gc.keys() and any(n.startswith("decoder") and "bert_attn" in n for n in ge)
        assert not any(n.startswith("bert.") for n in ge)  # the frozen encoder has no gradient
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=n)
