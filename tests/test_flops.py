"""The FLOPs counted from the dimensions (bench.py's compute floor) equal torch's FlopCounterMode on real forwards."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bertnmt.core.config import BertConfig, ModelConfig
from bertnmt.experiments.flops import EncoderDims, encoder_forward_flops, nmt_forward_flops, training_flops
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from tiny_encoder import make_tiny_bert

CFG = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=3, dropout=0.0)


def counted(fn) -> int:
    """FLOPs torch counts; the math SDPA backend makes every attention product a visible matmul."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("variant", ["plain", "fused", "decoder_only"])
def test_counted_flops_match_torch(tmp_path: Path, variant: str) -> None:
    bert = PretrainedEncoder(BertConfig(path=make_tiny_bert(tmp_path)))
    cfg = replace(CFG, fused=variant != "plain", fuse_encoder=variant == "fused")
    torch.manual_seed(0)
    model = BertFusedTransformer(cfg, 50, 0, bert if cfg.fused else None).eval()
    B, S, T, E = 3, 7, 6, 9
    src, tgt = torch.randint(4, 50, (B, S)), torch.randint(4, 50, (B, T))
    enc = torch.randint(1000, 2000, (B, E))
    mask = torch.ones_like(enc)
    h_b = bert(enc, mask).detach()  # (B, E, Hb)
    bert_out = (h_b, mask.eq(0)) if cfg.fused else None
    with torch.no_grad():
        got = counted(lambda: model(src, tgt, bert_out=bert_out))
        assert got == nmt_forward_flops(cfg, 50, B, S, T, E, 32)
        dims = EncoderDims.from_hf(bert.model.config)
        assert counted(lambda: bert(enc, mask)) == encoder_forward_flops(dims, B, E)


def test_training_flops_floors_are_ordered() -> None:
    dims = EncoderDims(hidden=384, layers=6, ffn=1536)  # all-MiniLM-L6-v2
    step = training_flops(replace(CFG, d_model=128, ffn_dim=512, enc_layers=6, dec_layers=6), 8000,
                          [(64, 16, 17, 18), (40, 25, 27, 28)], dims)
    floors = step.floors()
    assert 1.0 < floors["fused_cached"] < floors["fused_live"] < floors["fused_finetune"]
    assert step.fused_finetune - step.fused_cached == 3 * (step.fused_live - step.fused_cached)


def test_beam_decode_flops_match_torch(tmp_path: Path) -> None:
    from bertnmt.experiments.flops import beam_decode_flops
    from bertnmt.decoding.search import DecodeOptions, beam_search

    bert = PretrainedEncoder(BertConfig(path=make_tiny_bert(tmp_path)))
    B, S, E, K, L = 2, 7, 9, 3, 4
    src = torch.randint(4, 50, (B, S))
    enc = torch.randint(1000, 2000, (B, E))
    mask = torch.ones_like(enc)
    h_b = (bert(enc, mask).detach(), mask.eq(0))
    for fused in (False, True):
        torch.manual_seed(0)
        model = BertFusedTransformer(replace(CFG, fused=fused), 50, 0, bert if fused else None).eval()
        got = counted(lambda: beam_search(model, src, opts=DecodeOptions(beam=K, max_len_a=0.0, max_len_b=L, min_len=L),
                                          bert_out=h_b if fused else None))
        # L tokens then the forced eos: L + 1 decoder steps
        assert got == beam_decode_flops(CFG, 50, B, S, E, K, L + 1, 32, fused=fused)
