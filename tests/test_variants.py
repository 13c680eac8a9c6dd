"""The ablation variants of the model (paper sections 3 and 6): shapes, incremental = full decoding,
search, warm start from a plain checkpoint, the freeze policy, and the random controls (tiny sizes, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bertnmt.train.checkpoint import save_checkpoint, warm_start
from bertnmt.core.config import BertConfig, FreezeConfig, ModelConfig
from bertnmt.core.errors import CheckpointError, ConfigError
from bertnmt.train.freeze import FreezePolicy, param_group
from bertnmt.model import BertFusedTransformer, PretrainedEncoder
from bertnmt.model.pretrained import random_features
from bertnmt.model.variants import fused_layer_ids
from bertnmt.decoding.search import DecodeOptions, beam_search, greedy_search

try:
    from tests.test_model import make_batch as model_batch
    from tests.tiny_encoder import make_tiny_bert
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from test_model import make_batch as model_batch
    from tiny_encoder import make_tiny_bert

V, PAD, BOS, EOS = 30, 0, 2, 3

# (id, model kwargs, bert kwargs): every variant of conf/exp/ablation/ at tiny size
VARIANTS = [
    ("fused", {}, {}),
    ("no_enc_bert_attn", {"fuse_encoder": False}, {}),
    ("no_dec_bert_attn", {"fuse_decoder": False}, {}),
    ("stacked", {"fusion_combine": "stacked", "drop_net": 0.0}, {}),
    ("stacked_pre_ln", {"fusion_combine": "stacked", "pre_ln": True}, {}),
    ("fuse_first_1", {"fuse_layers": "first:1"}, {}),
    ("fuse_last_1", {"fuse_layers": "last:1"}, {}),
    ("dropnet_0.4", {"drop_net": 0.4}, {}),
    ("layer_1", {}, {"layer": 1}),
    ("layer_mix", {}, {"layer_mix": True}),
    ("feature_based", {"bert_input": "embedding"}, {}),
    ("bert_init_encoder", {"bert_input": "replace", "d_model": 24}, {}),  # d 24 != the encoder's 32
    ("random_features", {}, {"features": "random"}),
    ("random_encoder", {}, {"random_init": True}),
    ("transformer_3l", {"fused": False, "enc_layers": 3}, {}),
]
WARM_STARTABLE = {"fused", "no_enc_bert_attn", "no_dec_bert_attn", "stacked", "fuse_first_1", "fuse_last_1",
                  "dropnet_0.4", "layer_1", "layer_mix", "random_features", "random_encoder", "feature_based"}


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def build(bert_path: str, model_kw: dict, bert_kw: dict, seed: int = 0, frozen: bool = True) -> BertFusedTransformer:
    torch.manual_seed(seed)
    base = dict(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.0)
    cfg = ModelConfig(**{**base, **model_kw})
    bert = PretrainedEncoder(BertConfig(path=bert_path, **bert_kw)) if cfg.fused else None
    model = BertFusedTransformer(cfg, V, PAD, bert)
    if model.bert is not None:
        model.bert.set_frozen(frozen)
    return model


def make_batch(B: int = 3, S: int = 7, T: int = 6, E: int = 9, seed: int = 1):
    """test_model's right-padded batch, over this file's vocabulary."""
    return model_batch(B, S, T, E, seed, vocab=V)


def layers_with_bert_attn(stack) -> list[int]:
    return [i for i, layer in enumerate(stack.layers) if layer.bert_attn is not None]


@pytest.mark.parametrize("name, model_kw, bert_kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_shapes_incremental_and_search(bert_path, name, model_kw, bert_kw):
    model = build(bert_path, model_kw, bert_kw).eval()
    src, tgt, enc_ids, enc_mask = make_batch()
    with torch.no_grad():
        enc = model.encode(src, enc_ids, enc_mask)
        full = F.log_softmax(model.decode(tgt, enc), dim=-1)  # (B, T, V)
        state = model.init_decoder_state(enc)
        inc = torch.cat([F.log_softmax(model.decode(tgt[:, t : t + 1], None, state), dim=-1)
                         for t in range(tgt.size(1))], dim=1)
    assert full.shape == (3, 6, V)
    real = tgt.ne(PAD)
    assert torch.allclose(inc[real], full[real], atol=1e-5)
    if model.cfg.bert_input in ("embedding", "replace") and model.cfg.fused:
        # the decoder's memory runs over the pretrained encoder's tokens
        assert enc.enc_out.shape[:2] == enc_ids.shape and torch.equal(enc.src_pad, enc_mask.eq(0))
    else:
        assert enc.enc_out.shape == (3, 7, model.cfg.d_model)
    greedy = greedy_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1, max_len_b=5))
    beam = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1, max_len_b=5))
    assert [h[0][0] for h in beam] == greedy  # beam 1 = greedy, through the same incremental state
    assert all(len(h) <= 1.5 * 7 + 5 for h in greedy)


def test_fuse_layers_subsets(bert_path):
    first = build(bert_path, {"fuse_layers": "first:1"}, {})
    assert layers_with_bert_attn(first.encoder) == [0] and layers_with_bert_attn(first.decoder) == [0]
    last = build(bert_path, {"fuse_layers": "last:1", "enc_layers": 3}, {})
    assert layers_with_bert_attn(last.encoder) == [2] and layers_with_bert_attn(last.decoder) == [1]
    assert not any(".layers.1.bert_attn." in k for k in first.state_dict())
    assert fused_layer_ids("all", 3) == {0, 1, 2} and fused_layer_ids(" first:2 ", 6) == {0, 1}
    assert fused_layer_ids("last:2", 6) == {4, 5}
    for bad in ("first:0", "first:3", "mid:1", "last:-1", "first", "all:2"):
        with pytest.raises(ConfigError, match="model.fuse_layers"):
            build(bert_path, {"fuse_layers": bad}, {})


def test_bad_variant_values_are_config_errors(bert_path):
    with pytest.raises(ConfigError, match="model.fusion_combine='sum'"):
        build(bert_path, {"fusion_combine": "sum"}, {})
    with pytest.raises(ConfigError, match="model.bert_input='input'"):
        build(bert_path, {"bert_input": "input"}, {})
    with pytest.raises(ConfigError, match="model.drop_net=1.5"):
        build(bert_path, {"drop_net": 1.5}, {})
    with pytest.raises(ConfigError, match="bert.features='noise'"):
        build(bert_path, {}, {"features": "noise"})
    with pytest.raises(ConfigError, match="bert.layer_mix=true"):
        build(bert_path, {}, {"layer_mix": True, "layer": 1})


def test_stacked_layer_is_two_residual_sublayers(bert_path):
    """Encoder layer, post-LN: x1 = LN(x + SelfAttn(x)); x2 = LN_b(x1 + BertAttn(x1)); LN(x2 + FFN(x2))."""
    model = build(bert_path, {"fusion_combine": "stacked"}, {}).eval()
    layer = model.encoder.layers[0]
    assert layer.stacked and layer.bert_attn_ln is not None and model.decoder.layers[0].bert_attn_ln is not None
    x, hb = torch.randn(2, 5, 32), torch.randn(2, 4, 32)
    pad, bpad = torch.zeros(2, 5, dtype=torch.bool), torch.tensor([[False] * 4, [False, False, True, True]])
    with torch.no_grad():
        x1 = layer.self_attn_ln(x + layer.self_attn(x, key_padding_mask=pad))
        x2 = layer.bert_attn_ln(x1 + layer.bert_attn(x1, hb, key_padding_mask=bpad))
        want = layer.ffn_ln(x2 + layer.ffn(x2))
        assert torch.allclose(layer(x, pad, hb, bpad), want, atol=1e-6)
    assert param_group("encoder.layers.0.bert_attn_ln.weight") == "fusion"
    model.train()  # drop-net does not apply: both sublayers get gradients in every step
    src, tgt, enc_ids, enc_mask = make_batch()
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model(src, tgt, enc_ids, enc_mask).sum().backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("bert."))


def test_layer_mix_trains_while_the_encoder_is_frozen(bert_path):
    model = build(bert_path, {}, {"layer_mix": True})
    assert model.bert_mix is not None and model.bert_mix.weights.numel() == 3  # embeddings + 2 blocks
    assert not model.features_cacheable and build(bert_path, {}, {}).features_cacheable
    assert param_group("bert_mix.weights") == "fusion"
    policy = FreezePolicy(FreezeConfig(policy="frozen"))
    policy.apply(model, epoch=1)
    model.train()
    policy.apply(model, epoch=1)
    assert model.bert_mix.weights.requires_grad and model.bert_mix.gamma.requires_grad
    assert not any(p.requires_grad for p in model.bert.parameters())
    assert not any(m.training for m in model.bert.modules())  # the frozen encoder stays in eval mode
    src, tgt, enc_ids, enc_mask = make_batch()
    with torch.no_grad():  # zero weights, gamma 1: the plain average of the hidden states
        states = model.bert.model(input_ids=enc_ids, attention_mask=enc_mask, output_hidden_states=True).hidden_states
        h_b, _ = model.bert_features(enc_ids, enc_mask)
        assert torch.allclose(h_b, torch.stack(states).mean(0), atol=1e-6)
    model(src, tgt, enc_ids, enc_mask).sum().backward()
    assert model.bert_mix.weights.grad is not None and model.bert_mix.weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.bert.parameters())


def test_feature_based_and_replaced_encoder(bert_path):
    fb = build(bert_path, {"bert_input": "embedding"}, {})
    assert fb.bert_proj is not None and param_group("bert_proj.weight") == "fusion"
    assert not any(".bert_attn" in k for k in fb.state_dict()) and fb.encoder is not None
    rep = build(bert_path, {"bert_input": "replace", "d_model": 24}, {}, frozen=False)
    assert rep.encoder is None and rep.bert_proj is None
    assert not any(".bert_attn" in k for k in rep.state_dict())
    assert rep.decoder.layers[0].cross_attn.k_proj.weight.shape == (24, 32)  # keys from the encoder's width
    src, tgt, enc_ids, enc_mask = make_batch()
    rep.eval()  # the unfrozen encoder's dropout is on in training
    with torch.no_grad():
        assert torch.equal(rep.encode(src, enc_ids, enc_mask).enc_out, rep.bert(enc_ids, enc_mask))  # H_E is H_B
    policy = FreezePolicy(FreezeConfig(policy="finetune"))
    policy.apply(rep, epoch=1)
    rep.train()
    policy.apply(rep, epoch=1)
    assert rep.bert.model.training and all(p.requires_grad for p in rep.bert.parameters())
    rep(src, tgt, enc_ids, enc_mask).sum().backward()
    assert rep.bert.model.embeddings.word_embeddings.weight.grad is not None  # the encoder is fine-tuned
    assert policy.report(rep)["params_by_group"].get("encoder") is None


def test_random_features_are_fixed_per_sentence():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0]])
    mask = ids.ne(0).long()
    a = random_features(ids, mask, 16)
    assert a.shape == (2, 6, 16) and torch.equal(a[0, 4:], torch.zeros(2, 16)) and a[0, :4].abs().sum() > 0
    # the same sentence alone, with other padding, in another batch: the same vectors
    b = random_features(ids[1:, :4], mask[1:, :4], 16)
    assert torch.equal(b[0, :3], a[1, :3])
    assert not torch.allclose(a[0, :3], a[1, :3])  # another sentence, other vectors
    assert not torch.equal(random_features(ids, mask, 16, seed=1), a)
    assert abs(float(a[mask.bool()].std()) - 1.0) < 0.3


def test_random_features_do_not_run_the_encoder(bert_path, monkeypatch):
    model = build(bert_path, {}, {"features": "random"})
    monkeypatch.setattr(model.bert.model, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    _, _, enc_ids, enc_mask = make_batch()
    h_b, pad = model.bert_features(enc_ids, enc_mask)
    assert torch.equal(h_b, random_features(enc_ids, enc_mask, 32))


def test_random_encoder_is_reproducible_and_not_pretrained(bert_path):
    state = torch.get_rng_state()
    a = PretrainedEncoder(BertConfig(path=bert_path, random_init=True))
    assert torch.equal(torch.get_rng_state(), state)  # built under a forked RNG
    b = PretrainedEncoder(BertConfig(path=bert_path, random_init=True))
    c = PretrainedEncoder(BertConfig(path=bert_path, random_init=True, random_seed=1))
    pre = PretrainedEncoder(BertConfig(path=bert_path))
    key = "embeddings.word_embeddings.weight"
    sa, sb, sc, sp = (m.model.state_dict() for m in (a, b, c, pre))
    assert set(sa) == set(sp)  # the same architecture (no pooler)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # checkpoints need not store it
    assert not torch.equal(sa[key], sc[key]) and not torch.equal(sa[key], sp[key])


@pytest.mark.parametrize("name, model_kw, bert_kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_warm_start_from_a_plain_checkpoint(bert_path, tmp_path, name, model_kw, bert_kw):
    shape = {k: v for k, v in model_kw.items() if k == "d_model"}
    plain = build(bert_path, {"fused": False, **shape}, {}, seed=1)
    ckpt = tmp_path / "plain.pt"
    save_checkpoint(ckpt, {"model": plain.nmt_state_dict(), "meta": {"vocab_sha256": "v"}})
    model = build(bert_path, model_kw, bert_kw, seed=2)
    if name not in WARM_STARTABLE:  # another NMT encoder shape: a clear error (these rows start from scratch)
        with pytest.raises(CheckpointError, match="warm-start checkpoint"):
            warm_start(model, ckpt, "v")
        return
    new = warm_start(model, ckpt, "v")
    assert all(param_group(k) == "fusion" for k in new)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("name, model_kw, bert_kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_frozen_policy_leaves_the_encoder_untouched(bert_path, name, model_kw, bert_kw):
    model = build(bert_path, model_kw, bert_kw, frozen=False)
    if model.bert is None:
        return
    policy = FreezePolicy(FreezeConfig(policy="frozen"))
    model.train()
    policy.apply(model, epoch=1)
    assert model.bert.frozen and not model.bert.model.training
    before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    src, tgt, enc_ids, enc_mask = make_batch()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(src, tgt, enc_ids, enc_mask).logsumexp(-1).mean().backward()
        opt.step()
    assert all(torch.equal(v, model.bert.state_dict()[k]) for k, v in before.items())
    rep = policy.report(model)
    assert rep["total_params"] - rep["trainable_params"] == rep["params_by_group"]["bert"]["total"]
