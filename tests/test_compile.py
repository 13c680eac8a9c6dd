"""``trainer.compile=true``: the Trainer trains a torch.compile'd module that shares the model's parameters and
gives the eager losses. Dynamo's graph capture runs for real; the backend is "eager" here, because inductor's
C++ compilation takes minutes on 2 cores and its dropout masks come from another RNG (docs/benchmarks.md)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from bertnmt.config import FreezeConfig
from test_features import bert_path, fake_data, make_trainer  # noqa: F401  (bert_path: the fixture)


@pytest.mark.slow
def test_compiled_training_matches_eager(bert_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    data = fake_data(tmp_path / "data")
    eager, eager_losses, _ = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "a", 1, True)
    eager.fit()
    compiled, compiled_losses, _ = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "b", 1, True,
                                                compile=True)
    assert compiled.step_model is not compiled.model
    compiled.fit()
    assert len(compiled_losses) == len(eager_losses) > 2
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    # the compiled module trained the model's own parameters
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=name)
