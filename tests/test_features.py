"""The frozen-encoder feature cache: the stored H_B equals the live encoder's (fp16), cached and on-the-fly
training give the same losses, the cache is reused and respects its budget, and it is never served once any
part of the encoder trains (finetune, or after an unfreeze switch)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bertnmt.core.config import BertConfig, Config, DataConfig, FreezeConfig, FreezeRule, ModelConfig, OptimConfig, TrainerConfig
from bertnmt.data.collate import make_loader
from bertnmt.data.features import estimate_bytes, feature_cache
from bertnmt.data.prepare import PreparedData
from bertnmt.core.errors import ConfigError
from bertnmt.train.freeze import FreezePolicy
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from bertnmt.train.trainer import Trainer
from fake_data import fake_data as shared_fake_data
from tiny_encoder import make_tiny_bert

TINY = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def fake_data(folder: Path, n: int = 24) -> PreparedData:
    folder.mkdir(parents=True, exist_ok=True)
    return shared_fake_data(n, max_len=9, folder=folder)


def fused_model(bert_path: str) -> BertFusedTransformer:
    torch.manual_seed(0)
    return BertFusedTransformer(TINY, vocab_size=50, pad_id=0, bert=PretrainedEncoder(BertConfig(path=bert_path)))


def frozen_policy(model: BertFusedTransformer, cfg: FreezeConfig = FreezeConfig(policy="frozen")) -> FreezePolicy:
    policy = FreezePolicy(cfg)
    policy.apply(model, epoch=1, step=0)
    return policy


def build_cache(model: BertFusedTransformer, data: PreparedData, policy: FreezePolicy, **kw):
    kw = {"budget_gb": 1.0, "mode": "auto", **kw}
    return feature_cache(model.bert, data, "sha-of-the-weights", 0, torch.device("cpu"), kw["budget_gb"], kw["mode"],
                         policy.encoder_untrained(model))


class CountCalls:
    """Counts forward calls of the pretrained encoder."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        module.register_forward_hook(self.hook)

    def hook(self, *args) -> None:
        self.n += 1


def test_cached_features_equal_the_live_encoder(bert_path: str, tmp_path: Path) -> None:
    model = fused_model(bert_path)
    data = fake_data(tmp_path)
    stores = build_cache(model, data, frozen_policy(model))
    assert stores is not None and set(stores) == {"train", "valid"}
    train = data.splits["train"]
    assert stores["train"].values.dtype == np.float16 and stores["train"].hidden_size == 32
    assert stores["train"].values.shape[0] * 32 * 2 == estimate_bytes({"train": train}, 32)
    model.bert.eval()
    with torch.no_grad():
        for i in (0, 5, 23):  # each sentence alone, unpadded, against the batched, padded, stored one
            ids = torch.from_numpy(train.enc_ids[i].astype(np.int64))[None]
            live = model.bert(ids, torch.ones_like(ids))[0].numpy()  # (E, Hb)
            cached = stores["train"].get(i).astype(np.float32)
            assert cached.shape == live.shape
            np.testing.assert_allclose(cached, live, rtol=2e-3, atol=2e-3)
    # the batch carries the padded features next to the encoder ids
    loader = make_loader(train, max_tokens=100, seed=1, shuffle=True, enc_pad_id=0, features=stores["train"])
    b = next(iter(loader))
    assert b.bert_feats is not None and b.bert_feats.shape == (*b.enc_ids.shape, 32) and b.bert_feats.dtype == torch.float16
    assert torch.all(b.bert_feats[b.enc_mask.eq(0)] == 0)
    assert torch.equal(b.bert_feats[0, : int(b.enc_mask[0].sum())].float(),
                       torch.from_numpy(stores["train"].get(int(b.indices[0])).astype(np.float32)))


def test_cache_is_reused_and_respects_budget_and_mode(bert_path: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bertnmt.data.features")
    model = fused_model(bert_path)
    data = fake_data(tmp_path)
    policy = frozen_policy(model)
    calls = CountCalls(model.bert)
    assert build_cache(model, data, policy, budget_gb=1e-9) is None  # too big for the budget: on the fly
    assert calls.n == 0 and "exceeds the budget" in caplog.text
    first = build_cache(model, data, policy)
    n_built = calls.n
    assert n_built > 0 and "feature cache: built" in caplog.text
    second = build_cache(model, data, policy)  # same encoder, layer and data: reused, no forward pass
    assert calls.n == n_built and "feature cache: reusing" in caplog.text
    assert np.array_equal(first["valid"].values, second["valid"].values)
    assert build_cache(model, data, policy, mode="off") is None
    with pytest.raises(ConfigError, match="bert.cache_features='sometimes'"):
        build_cache(model, data, policy, mode="sometimes")
    finetune = FreezePolicy(FreezeConfig(policy="finetune"))
    finetune.apply(model, epoch=1, step=0)
    assert build_cache(model, data, finetune) is None
    assert "the pretrained encoder trains from the start" in caplog.text


def test_encoder_untrained_follows_the_schedule(bert_path: str) -> None:
    model = fused_model(bert_path)
    cases = {
        "frozen": (FreezeConfig(policy="frozen"), [True, True, True]),
        "finetune": (FreezeConfig(policy="finetune"), [False, False, False]),
        "unfreeze_after": (FreezeConfig(policy="unfreeze_after", unfreeze_at=2), [True, False, False]),
        # trains in epoch 2 only: frozen again in epoch 3, but its features changed for good
        "window": (FreezeConfig(policy="rules", rules=[
            FreezeRule(match="group:bert", frozen=True, end=2), FreezeRule(match="group:bert", frozen=False, start=2, end=3),
            FreezeRule(match="group:bert", frozen=True, start=3)]), [True, False, False]),
    }
    for name, (cfg, expected) in cases.items():
        policy = FreezePolicy(cfg)
        got = []
        for epoch in (1, 2, 3):
            policy.apply(model, epoch=epoch)
            got.append(policy.encoder_untrained(model))
        assert got == expected, name


def make_trainer(bert_path: str, data: PreparedData, freeze: FreezeConfig, run_dir: Path, epochs: int,
                 cached: bool, compile: bool = False, pad_multiple: int = 0) -> tuple[Trainer, list[float], CountCalls]:
    model = fused_model(bert_path)
    policy = frozen_policy(model, freeze)
    stores = build_cache(model, data, policy) if cached else None
    cfg = Config(model=TINY, freeze=freeze, optim=OptimConfig(lr=1e-3, warmup_steps=3),
                 data=DataConfig(max_tokens=100, pad_multiple=pad_multiple),
                 trainer=TrainerConfig(max_epochs=epochs, device="cpu", valid_bleu=False, tensorboard=False, progress=False,
                                       compile=compile))
    torch.manual_seed(123)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, model, data, policy, run_dir, "fused", {}, enc_pad_id=0, features=stores)
    losses: list[float] = []
    inner = trainer._forward_loss

    def record(batch):
        loss, nll = inner(batch)
        if trainer.model.training:
            losses.append(loss.item())
        return loss, nll

    trainer._forward_loss = record  # type: ignore[method-assign]
    return trainer, losses, CountCalls(model.bert)


def test_cached_and_live_training_give_the_same_losses(bert_path: str, tmp_path: Path) -> None:
    data = fake_data(tmp_path / "data")
    live, live_losses, live_calls = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "a", 2, False)
    live.fit()  # each trainer seeds the global RNG (dropout, drop-net) when built: build, then fit
    cached, cached_losses, cached_calls = make_trainer(bert_path, data, FreezeConfig(policy="frozen"), tmp_path / "b", 2, True)
    cached.fit()
    assert live_calls.n > 0 and cached_calls.n == 0  # the cached run never runs the encoder
    assert len(live_losses) == len(cached_losses) > 4
    np.testing.assert_allclose(cached_losses, live_losses, rtol=2e-3)
    for (name, a), b in zip(live.model.named_parameters(), cached.model.parameters()):
        # Adam moves a weight by <= ~lr = 1e-3 a step; fp16-rounded H_B may flip the sign of a few steps
        torch.testing.assert_close(b, a, rtol=0, atol=3e-3, msg=name)


def test_cache_is_never_served_once_the_encoder_trains(bert_path: str, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bertnmt.train.trainer")
    data = fake_data(tmp_path / "data")
    trainer, losses, calls = make_trainer(bert_path, data, FreezeConfig(policy="unfreeze_after", unfreeze_at=2),
                                          tmp_path / "run", 1, True)
    trainer.fit()  # epoch 1: frozen, cached
    assert calls.n == 0 and trainer.features and trainer.train_loader.dataset.features is not None
    trainer.cfg.trainer.max_epochs = 2
    trainer.start_epoch = 2
    trainer.fit()  # epoch 2: the encoder trains, so it runs live at every step
    assert not trainer.features and trainer.train_loader.dataset.features is None
    assert calls.n >= len(trainer.train_loader)
    assert any("feature cache off from epoch 2" in m for m in caplog.messages)
    # step unit: the switch happens mid-epoch and the very next update runs the encoder live
    step_cfg = FreezeConfig(policy="unfreeze_after", unit="step", unfreeze_at=2)
    trainer, losses, calls = make_trainer(bert_path, data, step_cfg, tmp_path / "run2", 1, True)
    live_at: list[tuple[int, bool]] = []  # (update index, did the encoder run) for each training forward
    inner = trainer._forward_loss

    def spy(batch):
        before = calls.n
        out = inner(batch)
        if trainer.model.training:
            live_at.append((trainer.step, calls.n > before))
        return out

    trainer._forward_loss = spy  # type: ignore[method-assign]
    trainer.fit()
    assert len(live_at) == len(trainer.train_loader) >= 3
    assert live_at == [(step, step >= 2) for step in range(len(live_at))]


def test_a_damaged_cache_file_of_the_same_size_is_rebuilt_not_served(bert_path: str, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bertnmt.data.features")
    model = fused_model(bert_path)
    data = fake_data(tmp_path)
    policy = frozen_policy(model)
    good = np.array(build_cache(model, data, policy)["train"].values)
    folder = next(tmp_path.glob("features-*"))
    path = folder / "train.npy"
    raw = bytearray(path.read_bytes())
    raw[-64:] = bytes(64)  # zeros over the last rows' values: same size, a valid .npy header
    path.write_bytes(bytes(raw))
    calls = CountCalls(model.bert)
    again = build_cache(model, data, policy)
    assert "train.npy fails its sha256 checksum" in caplog.text and calls.n > 0  # detected, then computed again
    assert np.array_equal(np.asarray(again["train"].values), good)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []  # the damaged copy is gone


def test_a_full_disk_while_building_is_one_line_and_leaves_nothing(bert_path: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from bertnmt.data import features
    from bertnmt.core.errors import OutputError

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features.os, "posix_fallocate", no_space)  # reserved before any write to the memory map
    model = fused_model(bert_path)
    data = fake_data(tmp_path)
    with pytest.raises(OutputError, match=f"no space left on device while writing {tmp_path}/features-"):
        build_cache(model, data, frozen_policy(model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", "features-"))]
