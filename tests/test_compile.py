"""``trainer.compile=true``: the Trainer trains a torch.compile'd module that shares the model's parameters and
gives the eager losses. Dynamo's graph capture runs for real; the backend is "eager" here, because inductor's
C++ compilation takes minutes on 2 cores and its dropout masks come from another RNG (docs/benchmarks.md)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from bertnmt.core.config import FreezeConfig
from bertnmt.model.fusion import set_drop_net_on_device
from test_features import bert_path, fake_data, make_trainer  # noqa: F401  (bert_path: the fixture)


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
    assert compiled.step_model is not compiled.model and compiled.pad_multiple == eager.pad_multiple == 8
    assert all(m.drop_net_on_device for m in compiled.model.modules() if hasattr(m, "drop_net_on_device"))
    compiled.fit()
    assert len(compiled_losses) == len(eager_losses) > 2
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    # the compiled module trained the model's own parameters
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)


def test_training_forward_and_loss_compile_as_one_graph(bert_path: str, tmp_path: Path) -> None:  # noqa: F811
    """fullgraph=True: no graph break in the fused model's training forward (drop-net on, drawn on the device),
    the loss included, on bucket-padded shapes; a data-dependent branch or shape would raise here."""
    from bertnmt.model.nmt import BertFusedTransformer
    from bertnmt.train.trainer import smoothed_loss
    from test_features import TINY, fused_model

    torch._dynamo.reset()
    model = fused_model(bert_path)
    assert isinstance(model, BertFusedTransformer) and TINY.drop_net > 0
    set_drop_net_on_device(model, True)
    model.train()

    def loss_fn(src, tgt_in, tgt_out, feats, bert_pad):
        logits = model(src, tgt_in, None, None, (feats, bert_pad))  # (B, T, V)
        return smoothed_loss(logits, tgt_out, 0, 0.1)[0]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(4, 50, (3, 8), generator=g), torch.randint(4, 50, (3, 16), generator=g)  # multiples of 8
    tgt[0, 10:] = 0
    feats, bert_pad = torch.randn(3, 8, model.bert.hidden_size, generator=g), torch.zeros(3, 8, dtype=torch.bool)
    losses = []
    for _ in range(2):
        loss = compiled(src, tgt, tgt, feats, bert_pad)
        loss.backward()
        losses.append(float(loss))
    assert all(0 < v < 1e4 for v in losses)
    assert model.decoder.layers[0].bert_attn.q_proj.weight.grad is not None
