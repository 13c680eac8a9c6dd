"""The NMT encoder with BERT-fused layers (paper section 4, eq. 1), and its ablation variants
(section 6: stacked instead of averaged, fusion in a subset of layers)."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from bertnmt.core.config import ModelConfig
from bertnmt.model.fusion import BertAttention, drop_net_mix, drop_net_weights, runs
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

    (w1, w2) come from :func:`drop_net_weights`; a branch whose weight is 0 is not computed.
    Without ``bert_attn`` (``bert_dim=None``) this is a plain Transformer layer (w1 = 1).

    ``model.fusion_combine=stacked`` (ablation, paper section 6) runs the two attentions one after
    the other instead, each with its own residual and LayerNorm (``bert_attn_ln``), no drop-net:
        x = LN(x + drop(SelfAttn(x)));  x = LN_b(x + drop(BertAttn(x, H_B)));  x = LN(x + drop(FFN(x)))
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None):
        super().__init__()
        C = cfg.d_model
        self.pre_ln, self.dropout, self.drop_net = cfg.pre_ln, cfg.dropout, cfg.drop_net
        self.drop_net_on_device = False  # set_drop_net_on_device: draws as tensors, both branches computed
        self.self_attn = MultiheadAttention(C, cfg.heads, dropout=cfg.attn_dropout)
        self.self_attn_ln = LayerNorm(C)
        self.bert_attn = (
            BertAttention(C, cfg.heads, bert_dim, dropout=cfg.attn_dropout) if bert_dim else None
        )
        self.stacked = bool(bert_dim) and cfg.fusion_combine == "stacked"
        self.bert_attn_ln = LayerNorm(C) if self.stacked else None
        self.ffn = FeedForward(C, cfg.ffn_dim, cfg.dropout, cfg.act_dropout)
        self.ffn_ln = LayerNorm(C)

    def _sublayer(self, x: Tensor, ln: nn.Module, fn) -> Tensor:
        """One residual sublayer, post-LN ``LN(x + drop(fn(x)))`` or pre-LN ``x + drop(fn(LN(x)))``."""
        if self.pre_ln:
            return x + F.dropout(fn(ln(x)), self.dropout, self.training)
        return ln(x + F.dropout(fn(x), self.dropout, self.training))

    def forward(
        self,
        x: Tensor,  # (B, S, C)
        src_pad: Tensor,  # (B, S) bool, True = pad
        bert_out: Tensor | None = None,  # (B, E, Hb)
        bert_pad: Tensor | None = None,  # (B, E) bool, True = pad
    ) -> Tensor:
        if self.bert_attn is not None and bert_out is None:
            raise ValueError("this encoder layer is BERT-fused: pass bert_out (H_B)")
        if self.stacked:  # ablation: self-attention, then BERT attention, each a residual sublayer
            x = self._sublayer(x, self.self_attn_ln, lambda h: self.self_attn(h, key_padding_mask=src_pad))
            x = self._sublayer(x, self.bert_attn_ln, lambda h: self.bert_attn(h, bert_out, key_padding_mask=bert_pad))
        else:
            if self.bert_attn is None:
                w1, w2 = 1.0, 0.0
            elif self.drop_net_on_device:
                w1, w2 = drop_net_mix(self.drop_net, self.training, x)
            else:
                w1, w2 = drop_net_weights(self.drop_net, self.training)
            h = self.self_attn_ln(x) if self.pre_ln else x
            y = x
            if runs(w1):
                y = y + w1 * F.dropout(self.self_attn(h, key_padding_mask=src_pad), self.dropout, self.training)
            if runs(w2):
                a = self.bert_attn(h, bert_out, key_padding_mask=bert_pad)
                y = y + w2 * F.dropout(a, self.dropout, self.training)
            x = y if self.pre_ln else self.self_attn_ln(y)  # (B, S, C)

        if self.pre_ln:
            return x + self.ffn(self.ffn_ln(x))
        return self.ffn_ln(x + self.ffn(x))  # (B, S, C)


class Encoder(nn.Module):
    """Positions + dropout + a stack of :class:`FusedEncoderLayer` (+ final LN in pre-LN).

    Takes already embedded tokens (the shared embedding lives in the whole model).
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None):
        super().__init__()
        self.dropout = cfg.dropout
        self.embed_scale = math.sqrt(cfg.d_model)
        self.positions = SinusoidalPositions(cfg.d_model, cfg.max_positions)
        fuse = bert_dim if cfg.fused and cfg.fuse_encoder else None
        which = fused_layer_ids(cfg.fuse_layers, cfg.enc_layers)  # model.fuse_layers: all | first:K | last:K
        self.layers = nn.ModuleList(
            FusedEncoderLayer(cfg, fuse if i in which else None) for i in range(cfg.enc_layers)
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
