"""The Trainer's update at the ATen level (bertnmt.experiments.opcount): no op that makes the host wait for the device, and
fewer kernel-launching ops than Hugging Face's MarianMTModel of the same size with a one-group AdamW."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from bertnmt.experiments.bench import marian_like
from bertnmt.core.config import Config, DataConfig, FreezeConfig, ModelConfig, OptimConfig, TrainerConfig
from bertnmt.train.freeze import FreezePolicy
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.experiments.opcount import OpCounter, launches_kernel
from bertnmt.train.trainer import EpochPosition, Trainer, smoothed_loss
from fake_data import fake_data
from test_features import bert_path, build_cache, fused_model, frozen_policy  # noqa: F401  (bert_path: the fixture)

PLAIN = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1, fused=False)
FUSED = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1, drop_net=1.0)


def trainer_cfg(model: ModelConfig, freeze: FreezeConfig, clip: float = 0.0) -> Config:
    return Config(model=model, freeze=freeze, optim=OptimConfig(lr=1e-3, warmup_steps=3, clip_norm=clip),
                  data=DataConfig(max_tokens=200),
                  trainer=TrainerConfig(max_epochs=1, device="cpu", valid_bleu=False, tensorboard=False, progress=False))


def counted_update(trainer: Trainer) -> tuple[OpCounter, Trainer]:
    """One update to create the optimizer state, then the next one under the counter."""
    trainer.model.train()
    trainer._sync_policy(1, at_epoch_start=True)
    pos = EpochPosition()
    trainer._start_sums(pos)
    batches = iter(trainer.train_loader)
    first, second = next(batches), next(batches)
    assert trainer._update([first], 1, pos)
    with OpCounter(patch_host_reads=True) as ops:
        assert trainer._update([second], 1, pos)
    return ops, trainer


def plain_trainer(clip: float = 0.0) -> Trainer:
    torch.manual_seed(0)
    cfg = trainer_cfg(PLAIN, FreezeConfig(policy="finetune"), clip)
    model = BertFusedTransformer(PLAIN, 50, 0, None)
    data = fake_data(60, max_len=9, with_encoder=False)
    return Trainer(cfg, model, data, FreezePolicy(cfg.freeze), Path(tempfile.mkdtemp()), "baseline", {})


def fused_trainer(bert_path: str, tmp_path: Path, freeze: FreezeConfig, clip: float, cached: bool) -> Trainer:  # noqa: F811
    data = fake_data(60, max_len=9, folder=tmp_path / "data")
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    model = fused_model(bert_path)
    policy = frozen_policy(model, freeze)
    stores = build_cache(model, data, policy) if cached else None
    return Trainer(trainer_cfg(FUSED, freeze, clip), model, data, policy, tmp_path / "run", "fused", {}, enc_pad_id=0,
                   features=stores)


def test_the_counter_sees_every_kind_of_host_sync() -> None:
    """Each way of making the host wait is caught (so that the no-sync test below can fail)."""
    x = torch.randn(6)
    mask = x > 0
    cases = {
        "_local_scalar_dense": lambda: float(x.sum()),
        "Tensor.item": lambda: x.sum().item(),
        "nonzero": lambda: x.nonzero(),
        "masked_select": lambda: x.masked_select(mask),
        "index with a boolean index": lambda: x[mask],
        "Tensor.cpu": lambda: x.cpu(),
        "Tensor.tolist": lambda: x.tolist(),
    }
    for reason, op in cases.items():
        with OpCounter(patch_host_reads=True) as ops:
            op()
        assert reason in ops.syncs, (reason, ops.syncs)
    with OpCounter(patch_host_reads=True) as ops:  # masks by multiplication and fixed-size gathers are fine
        (x * mask).sum() + x.gather(0, torch.tensor([0, 2]))[0]
    assert ops.syncs == [] and ops.launching >= 4
    assert not launches_kernel(torch.ops.aten.view.default) and launches_kernel(torch.ops.aten.mm.default)


@pytest.mark.parametrize("case", ["frozen_cached", "finetune_clip", "unfreeze_switch"])
def test_an_update_makes_no_host_sync(bert_path: str, tmp_path: Path, case: str) -> None:  # noqa: F811
    """Drop-net on, the frozen encoder's cached H_B, clipping, and a freeze switch at the counted update."""
    freeze = {"frozen_cached": FreezeConfig(policy="frozen"), "finetune_clip": FreezeConfig(policy="finetune"),
              "unfreeze_switch": FreezeConfig(policy="unfreeze_after", unit="step", unfreeze_at=1)}[case]
    trainer = fused_trainer(bert_path, tmp_path, freeze, clip=1.0 if case == "finetune_clip" else 0.0,
                            cached=case == "frozen_cached")
    ops, trainer = counted_update(trainer)
    assert ops.syncs == [], ops.syncs
    assert ops.launching > 100 and trainer.step == 2
    if case == "unfreeze_switch":
        assert all(p.requires_grad for p in trainer.model.bert.parameters())
    loss, tokens = trainer._sums.tolist()
    assert loss > 0 and tokens > 0  # the losses were summed on the device


def test_fewer_kernel_launches_than_marian() -> None:
    """The plain Transformer's whole update (freeze policy, loss, fused AdamW over one group, schedule) against
    MarianMTModel of the same dimensions with its usual step and a one-group AdamW, on the same batch."""
    ours, trainer = counted_update(plain_trainer())
    assert len(trainer.optimizer.param_groups) == 1 and trainer.optimizer.defaults["fused"]
    batches = iter(trainer.train_loader)
    first, second = next(batches), next(batches)
    torch.manual_seed(0)
    marian = marian_like(PLAIN, 50, 0)
    marian.train()
    opt = torch.optim.AdamW(marian.parameters(), lr=1e-4)

    def step(b) -> None:
        logits = marian(input_ids=b.src, attention_mask=b.src.ne(0), decoder_input_ids=b.tgt_in,
                        decoder_attention_mask=b.tgt_in.ne(0)).logits  # (B, T, V)
        loss, _ = smoothed_loss(logits, b.tgt_out, 0, 0.1)
        (loss / b.ntokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(first)
    with OpCounter() as theirs:
        step(second)
    assert ours.launching <= theirs.launching and ours.total <= theirs.total, (ours.summary(), theirs.summary())
    assert ours.launching <= 450, ours.summary()  # 344 measured: one group per tensor would add hundreds


def test_bucket_padding_gives_few_shapes_and_the_same_loss() -> None:
    """data.pad_multiple=8: every length a multiple of 8 and the output positions a multiple of 64 (what
    torch.compile and CUDA graphs need), with the loss of the unpadded batch."""
    from bertnmt.data.collate import make_loader
    from bertnmt.train.trainer import forward_loss, resolve_pad_multiple

    assert resolve_pad_multiple(0, torch.device("cpu"), False) == 1
    assert resolve_pad_multiple(0, torch.device("cuda"), False) == resolve_pad_multiple(0, torch.device("cpu"), True) == 8
    torch.manual_seed(0)
    model = BertFusedTransformer(PLAIN, 50, 0, None).eval()
    data = fake_data(60, max_len=9, with_encoder=False)
    plain, padded = (list(make_loader(data.splits["train"], 200, 0, False, None, pad_multiple=m)) for m in (1, 8))
    for a, b in zip(plain, padded):
        assert b.src.size(1) % 8 == 0 and b.tgt_out.size(1) % 8 == 0 and b.out_idx.numel() % 64 == 0
        assert a.out_idx.numel() == a.ntokens == b.ntokens
        with torch.no_grad():
            la, na = forward_loss(model, a, 0, 0.1, torch.device("cpu"))
            lb, nb = forward_loss(model, b, 0, 0.1, torch.device("cpu"))
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(nb, na, rtol=1e-5, atol=1e-4)
