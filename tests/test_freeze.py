"""The freeze policy: frozen encoder weights stay bit-identical, eval mode holds, groups hold every parameter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bertnmt.config import BertConfig, FreezeConfig, ModelConfig, OptimConfig
from bertnmt.errors import ConfigError
from bertnmt.freeze import FreezePolicy
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from bertnmt.training import smoothed_loss
from tiny_encoder import make_tiny_bert

TINY = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def fused_model(bert_path: str) -> BertFusedTransformer:
    torch.manual_seed(0)
    bert = PretrainedEncoder(BertConfig(path=bert_path))
    return BertFusedTransformer(TINY, vocab_size=50, pad_id=0, bert=bert)


def batch(vocab: int = 50, bert_vocab: int = 100) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, vocab, (3, 7), generator=g)  # (B, S)
    tgt = torch.randint(4, vocab, (3, 6), generator=g)  # (B, T)
    enc = torch.randint(5, bert_vocab, (3, 9), generator=g)  # (B, E)
    mask = torch.ones_like(enc)
    mask[0, 6:] = 0
    return src, tgt, enc, mask


def train_steps(model: BertFusedTransformer, policy: FreezePolicy, steps: int, weight_decay: float = 0.1) -> None:
    opt = torch.optim.AdamW(policy.param_groups(model, OptimConfig()), lr=1e-2, weight_decay=weight_decay)
    src, tgt, enc, mask = batch()
    model.train()
    for _ in range(steps):
        logits = model(src, tgt, enc, mask)
        loss, _ = smoothed_loss(logits, tgt, 0, 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_frozen_encoder_is_bit_identical_and_in_eval_mode(bert_path: str) -> None:
    model = fused_model(bert_path)
    policy = FreezePolicy(FreezeConfig(policy="frozen"))
    policy.apply(model)
    before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    nmt_before = model.encoder.layers[0].bert_attn.q_proj.weight.clone() if hasattr(
        model.encoder.layers[0].bert_attn, "q_proj") else None
    train_steps(model, policy, steps=4)
    model.train()
    assert not any(m.training for m in model.bert.modules()), "frozen encoder must stay in eval mode"
    assert all(not p.requires_grad for p in model.bert.parameters())
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, before[k]), k
    if nmt_before is not None:
        assert not torch.equal(model.encoder.layers[0].bert_attn.q_proj.weight, nmt_before)
    # the optimizer groups hold every parameter (a later unfreeze needs no new optimizer)
    groups = policy.param_groups(model, OptimConfig())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_trains_the_encoder(bert_path: str) -> None:
    model = fused_model(bert_path)
    policy = FreezePolicy(FreezeConfig(policy="finetune"))
    policy.apply(model)
    before = {k: v.clone() for k, v in model.bert.named_parameters()}
    train_steps(model, policy, steps=2)
    assert model.bert.training is True
    changed = [k for k, v in model.bert.named_parameters() if not torch.equal(v, before[k])]
    assert changed


def test_report_counts_per_group(bert_path: str) -> None:
    model = fused_model(bert_path)
    policy = FreezePolicy(FreezeConfig(policy="frozen"))
    policy.apply(model)
    rep = policy.report(model)
    bert_total = sum(p.numel() for p in model.bert.parameters())
    assert rep["total_params"] == sum(p.numel() for p in model.parameters())
    assert rep["trainable_params"] == rep["total_params"] - bert_total
    assert rep["params_by_group"]["bert"] == {"trainable": 0, "total": bert_total}
    assert rep["params_by_group"]["fusion"]["trainable"] > 0


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="freeze.policy='thaw'"):
        FreezePolicy(FreezeConfig(policy="thaw"))
