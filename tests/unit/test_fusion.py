"""Fusion in one place (bertnmt/model/fusion.py): drop-net's generator travels in the state dict, inference
averages the two branches, both fused layers run the same FusedSublayer, and the fusion module names match
what the model builds (tiny sizes, CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bertnmt.core.config import BertConfig, ModelConfig
from bertnmt.model import BertFusedTransformer, FusedDecoderLayer, FusedEncoderLayer, PretrainedEncoder
from bertnmt.model.fusion import FUSION_MODULES, DropNet, FusedSublayer, drop_nets, is_fusion_param, seed_drop_net
from bertnmt.model.layers import LayerNorm
from bertnmt.train.averaging import average_checkpoints
from bertnmt.train.checkpoint import (
    load_checkpoint,
    load_model_weights,
    model_weights,
    restore_old_drop_net,
    save_checkpoint,
    warm_start,
)

TINY = dict(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1)
V, PAD = 40, 0
LIKE = torch.zeros(())


def build(bert_path: str | None, seed: int = 0, **kw) -> BertFusedTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **kw})
    bert = PretrainedEncoder(BertConfig(path=bert_path)) if cfg.fused else None
    return BertFusedTransformer(cfg, V, PAD, bert)


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(4, V, (2, 5), generator=g), torch.randint(4, V, (2, 4), generator=g)
    bert_ids = torch.randint(1000, 2000, (2, 6), generator=g)
    return src, tgt, bert_ids, torch.ones(2, 6, dtype=torch.long)


def test_drop_net_state_round_trips_through_the_state_dict() -> None:
    a = DropNet(1.0)
    a.seed(11)
    [a.draw(True, LIKE) for _ in range(7)]
    state = a.state_dict()
    assert set(state) == {"_extra_state"} and state["_extra_state"].dtype == torch.int64
    b = DropNet(1.0)  # seed 0: other draws until it loads a's state
    b.load_state_dict(state)
    draws = [a.draw(True, LIKE) for _ in range(50)]
    assert draws == [b.draw(True, LIKE) for _ in range(50)] and set(draws) == {(1.0, 0.0), (0.0, 1.0)}
    assert draws != [DropNet(1.0).draw(True, LIKE) for _ in range(50)]  # the load did change b's draws


def test_model_state_dict_and_checkpoint_carry_the_draws(bert_path: str, tmp_path: Path) -> None:
    model = build(bert_path).train()
    (net,) = drop_nets(model)  # one DropNet, shared by the 4 fused layers
    assert all(layer.fused.drop_net is net for layer in [*model.encoder.layers, *model.decoder.layers])
    seed_drop_net(model, 5)
    src, tgt, bert_ids, bert_mask = batch()
    model(src, tgt, bert_ids, bert_mask)  # 4 draws
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": model_weights(model, include_bert=False)})  # weights_only-loadable tensors
    keys = [k for k in load_checkpoint(path)["model"] if k.endswith("_extra_state")]
    assert keys == [f"{s}.layers.{i}.fused.drop_net._extra_state" for s in ("encoder", "decoder") for i in (0, 1)]
    other = build(bert_path, seed=1).train()
    seed_drop_net(other, 99)
    load_model_weights(other, load_checkpoint(path)["model"], str(path))
    expected = [net.draw(True, LIKE) for _ in range(30)]
    assert [drop_nets(other)[0].draw(True, LIKE) for _ in range(30)] == expected


def test_state_dicts_without_drop_net_state_still_load(bert_path: str) -> None:
    model = build(bert_path)
    seed_drop_net(model, 3)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}  # written before DropNet
    fresh = build(bert_path, seed=1)
    seed_drop_net(fresh, 3)
    fresh.load_state_dict(old, strict=True)  # no missing-key error; the seeded draws stay
    assert drop_nets(fresh)[0].rng.getstate() == drop_nets(model)[0].rng.getstate()
    # such a checkpoint kept the generator among the RNG states: a resume restores it from there
    net = DropNet(1.0)
    net.seed(8)
    [net.draw(True, LIKE) for _ in range(3)]
    restore_old_drop_net(fresh, {"model": old, "rng": {"drop_net": net.rng.getstate()}})
    assert [drop_nets(fresh)[0].draw(True, LIKE) for _ in range(20)] == [net.draw(True, LIKE) for _ in range(20)]


def test_warm_start_from_a_plain_checkpoint_keeps_the_seeded_draws(bert_path: str, tmp_path: Path) -> None:
    plain = build(None, fused=False)
    assert drop_nets(plain) == [] and not any(k.endswith("_extra_state") for k in plain.state_dict())
    save_checkpoint(tmp_path / "plain.pt", {"model": plain.nmt_state_dict(), "meta": {"vocab_sha256": "v"}})
    model = build(bert_path, seed=1)
    seed_drop_net(model, 4)
    before = drop_nets(model)[0].rng.getstate()
    new = warm_start(model, tmp_path / "plain.pt", "v")
    assert new and all(is_fusion_param(k) for k in new) and drop_nets(model)[0].rng.getstate() == before


def test_inference_averages_the_two_branches() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8)  # (B, T, C)
    ln = LayerNorm(8)
    first, bert = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    for pre_ln in (False, True):
        sub = FusedSublayer(pre_ln, dropout=0.3, drop_net=DropNet(1.0)).eval()
        h = ln(x) if pre_ln else x
        y = x + 0.5 * first(h) + 0.5 * bert(h)
        torch.testing.assert_close(sub(x, ln, first, bert), y if pre_ln else ln(y), rtol=0, atol=0)
    assert {DropNet(1.0).draw(False, LIKE) for _ in range(20)} == {(0.5, 0.5)}


def test_training_runs_only_the_kept_branch() -> None:
    x = torch.randn(2, 3, 8)
    ln = LayerNorm(8)
    calls: list[str] = []

    def branch(name: str):
        def run(h: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return h * 2.0
        return run

    sub = FusedSublayer(False, 0.0, DropNet(1.0)).train()
    seed_drop_net(sub, 2)
    expected = []
    probe = DropNet(1.0, seed=2)  # the same stream of draws
    for _ in range(20):
        w1, w2 = probe.draw(True, LIKE)
        expected.append("first" if w1 else "bert")
        y = sub(x, ln, branch("first"), branch("bert"))
        torch.testing.assert_close(y, ln(x + (w1 + w2) * 2.0 * x))
    assert calls == expected and set(calls) == {"first", "bert"}


def test_both_fused_layers_run_the_same_sublayer(bert_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build(bert_path).eval()
    fused = [layer for layer in [*model.encoder.layers, *model.decoder.layers]]
    assert {type(layer) for layer in fused} == {FusedEncoderLayer, FusedDecoderLayer}
    assert all(type(layer.fused) is FusedSublayer for layer in fused)
    seen: list[int] = []
    inner = FusedSublayer.forward

    def spy(self, x, ln, first, bert=None, bert_ln=None):
        seen.append(id(self))
        return inner(self, x, ln, first, bert, bert_ln)

    monkeypatch.setattr(FusedSublayer, "forward", spy)
    with torch.no_grad():
        model(*batch())
    # one call per layer, encoder then decoder (the decoder's self-attention sublayer is FusedSublayer.residual)
    assert seen == [id(layer.fused) for layer in fused]


def test_fusion_module_names_are_what_the_variants_add(bert_path: str) -> None:
    """FUSION_MODULES holds exactly the module names a fused variant adds to the plain Transformer's weights."""
    plain = set(build(None, fused=False).state_dict())
    added: set[str] = set()
    for kw in ({}, {"fusion_combine": "stacked"}, {"bert_input": "embedding"}):
        new = {k for k in build(bert_path, **kw).state_dict() if not k.startswith("bert.")} - plain
        params = {k for k in new if not k.endswith("_extra_state")}
        assert params and all(is_fusion_param(k) for k in params)
        added |= {part for k in params for part in k.split(".")[:-1] if part in FUSION_MODULES}
    torch.manual_seed(0)
    enc = PretrainedEncoder(BertConfig(path=bert_path, layer_mix=True))
    mix = BertFusedTransformer(ModelConfig(**TINY), V, PAD, enc)
    added |= {k.split(".")[0] for k in mix.state_dict() if k.startswith("bert_mix.")}
    assert added == FUSION_MODULES


def test_averaging_keeps_the_last_drop_net_state(bert_path: str, tmp_path: Path) -> None:
    model = build(bert_path).train()
    paths = []
    for step in (1, 2):
        model(*batch())  # draws: the generator state moves on
        paths.append(tmp_path / f"c{step}.pt")
        save_checkpoint(paths[-1], {"model": model_weights(model, include_bert=False), "step": step})
    out = load_checkpoint(average_checkpoints(paths, tmp_path / "avg.pt"))["model"]
    last = load_checkpoint(paths[-1])["model"]
    key = "encoder.layers.0.fused.drop_net._extra_state"
    assert not torch.equal(load_checkpoint(paths[0])["model"][key], last[key]) and torch.equal(out[key], last[key])
    assert F.mse_loss(out["embed_tokens.weight"], last["embed_tokens.weight"]) == 0  # no training step between
