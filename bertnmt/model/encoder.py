"""The NMT encoder with BERT-fused layers (paper section 4, eq. 1), and its ablation variants
(section 6: stacked instead of averaged, fusion in a subset of layers)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from bertnmt.core.config import ModelConfig
from bertnmt.model.fusion import DropNet, add_fusion
from bertnmt.model.layers import FeedForward, LayerNorm, MultiheadAttention, SinusoidalPositions
from bertnmt.model.variants import fused_layer_ids


class FusedEncoderLayer(nn.Module):
    """One encoder layer: self-attention ‖ BERT attention, then the FFN (paper eq. 1).

    Post-LN (paper):
        x = LN(x + w1·drop(SelfAttn(x)) + w2·drop(BertAttn(x, H_B)))
        x = LN(x + drop(FFN(x)))
    Pre-LN (option, plus ``encoder.final_ln``):
        x = x + w1·drop(SelfAttn(LN(x))) + w2·drop(BertAttn(LN(x), H_B))
        x = x + drop(FFN(LN(x)))

    (w1, w2) come from drop-net (:class:`~bertnmt.model.fusion.FusedSublayer`, shared with the decoder);
    a branch whose weight is 0 is not computed. Without ``bert_attn`` (``bert_dim=None``) this is a plain
    Transformer layer (w1 = 1). ``drop_net``: the model's shared :class:`DropNet` (None: one of its own).

    ``model.fusion_combine=stacked`` (ablation, paper section 6) runs the two attentions one after
    the other instead, each with its own residual and LayerNorm (``bert_attn_ln``), no drop-net:
        x = LN(x + drop(SelfAttn(x)));  x = LN_b(x + drop(BertAttn(x, H_B)));  x = LN(x + drop(FFN(x)))
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None, drop_net: DropNet | None = None):
        super().__init__()
        C = cfg.d_model
        self.pre_ln = cfg.pre_ln
        self.self_attn = MultiheadAttention(C, cfg.heads, dropout=cfg.attn_dropout)
        self.self_attn_ln = LayerNorm(C)
        add_fusion(self, cfg, bert_dim, drop_net)  # bert_attn, bert_attn_ln, stacked, fused
        self.ffn = FeedForward(C, cfg.ffn_dim, cfg.dropout, cfg.act_dropout)
        self.ffn_ln = LayerNorm(C)

    def forward(
        self,
        x: Tensor,  # (B, S, C)
        src_pad: Tensor,  # (B, S) bool, True = pad
        bert_out: Tensor | None = None,  # (B, E, Hb)
        bert_pad: Tensor | None = None,  # (B, E) bool, True = pad
    ) -> Tensor:
        bert = None
        if self.bert_attn is not None:
            if bert_out is None:
                raise ValueError("this encoder layer is BERT-fused: pass bert_out (H_B)")
            bert = lambda h: self.bert_attn(h, bert_out, key_padding_mask=bert_pad)  # noqa: E731
        x = self.fused(x, self.self_attn_ln, lambda h: self.self_attn(h, key_padding_mask=src_pad), bert,
                       self.bert_attn_ln)  # (B, S, C)
        if self.pre_ln:
            return x + self.ffn(self.ffn_ln(x))
        return self.ffn_ln(x + self.ffn(x))  # (B, S, C)


class Encoder(nn.Module):
    """Positions + dropout + a stack of :class:`FusedEncoderLayer` (+ final LN in pre-LN).

    Takes already embedded tokens (the shared embedding lives in the whole model).
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None, drop_net: DropNet | None = None):
        super().__init__()
        self.dropout = cfg.dropout
        self.embed_scale = math.sqrt(cfg.d_model)
        self.positions = SinusoidalPositions(cfg.d_model, cfg.max_positions)
        fuse = bert_dim if cfg.fused and cfg.fuse_encoder else None
        which = fused_layer_ids(cfg.fuse_layers, cfg.enc_layers)  # model.fuse_layers: all | first:K | last:K
        drop_net = drop_net or DropNet(cfg.drop_net)  # one stream of draws for all fused layers
        self.layers = nn.ModuleList(
            FusedEncoderLayer(cfg, fuse if i in which else None, drop_net) for i in range(cfg.enc_layers)
        )
        self.final_ln = LayerNorm(cfg.d_model) if cfg.pre_ln else None

    def forward(
        self,
        tok_emb: Tensor,  # (B, S, C) unscaled token embeddings
        src_pad: Tensor,  # (B, S) bool
        bert_out: Tensor | None = None,  # (B, E, Hb)
        bert_pad: Tensor | None = None,  # (B, E) bool
    ) -> Tensor:
        x = self.embed_scale * tok_emb + self.positions(tok_emb.size(1))  # (B, S, C)
        x = F.dropout(x, self.dropout, self.training)
        for layer in self.layers:
            x = layer(x, src_pad, bert_out, bert_pad)
        if self.final_ln is not None:
            x = self.final_ln(x)
        return x  # (B, S, C)
