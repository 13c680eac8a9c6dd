"""The NMT decoder with BERT-fused layers (paper section 4, eq. 3) and its incremental state, and its
ablation variants (section 6: stacked instead of averaged, fusion in a subset of layers)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertnmt.core.config import ModelConfig
from bertnmt.model.fusion import BertAttention, drop_net_mix, drop_net_weights, runs
from bertnmt.model.layers import KV, FeedForward, KVCache, LayerNorm, MultiheadAttention, SinusoidalPositions
from bertnmt.model.variants import fused_layer_ids


@dataclass
class DecoderState:
    """Everything incremental decoding keeps between steps, batch-first.

    The decoder runs on N = Bs * group rows. The static keys/values (computed once per
    sentence) have Bs rows, each shared by ``group`` consecutive decoder rows: the beams of
    one sentence (see :meth:`expand`), so they are never repeated per beam.

    self_kv:  per layer, the self-attention :class:`KVCache` (N rows, t steps)
    cross_kv: per layer, the static encoder-decoder keys/values (Bs, H, S, Dh)
    bert_kv:  per layer, the static BERT-attention keys/values (Bs, H, E, Dh), or None
    src_pad (Bs, S) / bert_pad (Bs, E): the padding masks that go with them
    step:     the position of the next input token
    """

    self_kv: list[KVCache]
    cross_kv: list[KV]
    bert_kv: list[KV | None]
    src_pad: Tensor
    bert_pad: Tensor | None = None
    step: int = 0
    group: int = 1

    @property
    def batch_size(self) -> int:
        """N, the number of decoder rows."""
        return self.src_pad.size(0) * self.group

    def expand(self, n: int) -> "DecoderState":
        """Repeat every row ``n`` times in place (B -> B * n beams); the static K/V are shared."""
        index = torch.arange(self.batch_size, device=self.src_pad.device).repeat_interleave(n)
        for cache in self.self_kv:
            cache.reorder(index)
        self.group *= n
        return self

    def select(self, index: Tensor) -> "DecoderState":
        """Keep decoder rows ``index`` (N',), in that order, in place; returns self.

        Used for beam reordering and for dropping finished sentences. The self-attention caches
        follow ``index``; the static K/V and masks follow the sentences, ``index // group``.
        With ``group > 1`` each group of rows must come from one sentence (beams move only
        within their sentence; sentences are kept or dropped whole).
        """
        for cache in self.self_kv:
            cache.reorder(index)
        g, n_sent = self.group, self.src_pad.size(0)
        sent = index[::g] // g if g > 1 else index  # (N' / g,)
        if g > 1 and not torch.equal(index.view(-1, g) // g, sent.unsqueeze(1).expand(-1, g)):
            raise ValueError("DecoderState.select: rows of a beam group must stay together")
        if sent.numel() == n_sent and torch.equal(sent, torch.arange(n_sent, device=sent.device)):
            return self  # same sentences in the same order: static tensors unchanged
        pick = lambda t: t.index_select(0, sent)  # noqa: E731
        self.cross_kv = [(pick(k), pick(v)) for k, v in self.cross_kv]
        self.bert_kv = [None if kv is None else (pick(kv[0]), pick(kv[1])) for kv in self.bert_kv]
        self.src_pad = pick(self.src_pad)
        if self.bert_pad is not None:
            self.bert_pad = pick(self.bert_pad)
        return self

    reorder = select  # beam reordering is a select whose rows stay within their groups

    def reorder_beams(self, index: Tensor) -> "DecoderState":
        """Reorder decoder rows (N,) within their groups, in place; the caller guarantees that every
        group keeps its sentence. Unlike :meth:`select` it never reads the index on the host (no sync)."""
        for cache in self.self_kv:
            cache.reorder(index)
        return self


class FusedDecoderLayer(nn.Module):
    """Self-attention, then encoder-decoder attention ‖ BERT attention, then the FFN (paper eq. 3).

    Post-LN (paper):
        s = LN(s + drop(SelfAttn(s)))
        s = LN(s + w1·drop(EncDecAttn(s, H_E)) + w2·drop(BertAttn(s, H_B)))
        s = LN(s + drop(FFN(s)))
    Pre-LN (option) applies each LN to the branch input instead, plus ``decoder.final_ln``.
    (w1, w2) come from :func:`drop_net_weights` (always (0.5, 0.5) at inference); a branch
    whose weight is 0 is not computed.

    ``model.fusion_combine=stacked`` (ablation, paper section 6): encoder-decoder attention, then
    BERT attention, each with its own residual and LayerNorm (``bert_attn_ln``), no drop-net.
    ``enc_dim``: the width of the encoder output when it is not ``d_model`` (``model.bert_input=replace``:
    the pretrained encoder is the NMT encoder).
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None, enc_dim: int | None = None):
        super().__init__()
        C = cfg.d_model
        self.pre_ln, self.dropout, self.drop_net = cfg.pre_ln, cfg.dropout, cfg.drop_net
        self.drop_net_on_device = False  # set_drop_net_on_device: draws as tensors, both branches computed
        self.self_attn = MultiheadAttention(C, cfg.heads, dropout=cfg.attn_dropout)
        self.self_attn_ln = LayerNorm(C)
        self.cross_attn = MultiheadAttention(C, cfg.heads, kdim=enc_dim, dropout=cfg.attn_dropout)
        self.cross_attn_ln = LayerNorm(C)
        self.bert_attn = (
            BertAttention(C, cfg.heads, bert_dim, dropout=cfg.attn_dropout) if bert_dim else None
        )
        self.stacked = bool(bert_dim) and cfg.fusion_combine == "stacked"
        self.bert_attn_ln = LayerNorm(C) if self.stacked else None
        self.ffn = FeedForward(C, cfg.ffn_dim, cfg.dropout, cfg.act_dropout)
        self.ffn_ln = LayerNorm(C)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)

    def forward(
        self,
        x: Tensor,  # (B, T, C)
        enc_out: Tensor | None,  # (B, S, C); unused when cross_kv is given
        src_pad: Tensor,  # (B, S) bool
        bert_out: Tensor | None = None,  # (B, E, Hb); unused when bert_kv is given
        bert_pad: Tensor | None = None,  # (B, E) bool
        cache: KVCache | None = None,
        cross_kv: KV | None = None,
        bert_kv: KV | None = None,
    ) -> Tensor:
        pre = self.pre_ln
        # 1. masked self-attention (causal; incremental with a cache)
        h = self.self_attn_ln(x) if pre else x
        y = x + self._drop(self.self_attn(h, causal=True, cache=cache))
        x = y if pre else self.self_attn_ln(y)  # (B, T, C)

        # 2. encoder-decoder attention ‖ BERT attention, mixed by drop-net
        if self.bert_attn is not None and bert_out is None and bert_kv is None:
            raise ValueError("this decoder layer is BERT-fused: pass bert_out (H_B)")
        if self.stacked:  # ablation: encoder-decoder attention, then BERT attention, each a residual sublayer
            h = self.cross_attn_ln(x) if pre else x
            y = x + self._drop(self.cross_attn(h, enc_out, key_padding_mask=src_pad, static_kv=cross_kv))
            x = y if pre else self.cross_attn_ln(y)
            h = self.bert_attn_ln(x) if pre else x
            y = x + self._drop(self.bert_attn(h, bert_out, key_padding_mask=bert_pad, static_kv=bert_kv))
            x = y if pre else self.bert_attn_ln(y)  # (B, T, C)
        else:
            if self.bert_attn is None:
                w1, w2 = 1.0, 0.0
            elif self.drop_net_on_device:
                w1, w2 = drop_net_mix(self.drop_net, self.training, x)
            else:
                w1, w2 = drop_net_weights(self.drop_net, self.training)
            h = self.cross_attn_ln(x) if pre else x
            y = x
            if runs(w1):
                a = self.cross_attn(h, enc_out, key_padding_mask=src_pad, static_kv=cross_kv)
                y = y + w1 * self._drop(a)
            if runs(w2):
                a = self.bert_attn(h, bert_out, key_padding_mask=bert_pad, static_kv=bert_kv)
                y = y + w2 * self._drop(a)
            x = y if pre else self.cross_attn_ln(y)  # (B, T, C)

        # 3. FFN
        if pre:
            return x + self.ffn(self.ffn_ln(x))
        return self.ffn_ln(x + self.ffn(x))  # (B, T, C)


class Decoder(nn.Module):
    """Positions + dropout + a stack of :class:`FusedDecoderLayer` (+ final LN in pre-LN).

    Takes already embedded target tokens; returns hidden states (the output projection lives in
    the whole model). Full teacher-forced pass when ``state`` is None, else one incremental step.
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None, enc_dim: int | None = None):
        super().__init__()
        self.dropout = cfg.dropout
        self.embed_scale = math.sqrt(cfg.d_model)
        self.positions = SinusoidalPositions(cfg.d_model, cfg.max_positions)
        fuse = bert_dim if cfg.fused and cfg.fuse_decoder else None
        which = fused_layer_ids(cfg.fuse_layers, cfg.dec_layers)  # model.fuse_layers: all | first:K | last:K
        self.layers = nn.ModuleList(
            FusedDecoderLayer(cfg, fuse if i in which else None, enc_dim) for i in range(cfg.dec_layers)
        )
        self.final_ln = LayerNorm(cfg.d_model) if cfg.pre_ln else None

    def init_state(
        self, enc_out: Tensor, src_pad: Tensor, bert_out: Tensor | None, bert_pad: Tensor | None
    ) -> DecoderState:
        """Precompute the static K/V of every layer's cross and BERT attention, once per sentence."""
        # contiguous once here, so that no decoding step copies them again (they are read at every step)
        contig = lambda kv: (kv[0].contiguous(), kv[1].contiguous())  # noqa: E731  (Bs, H, S, Dh) each
        cross_kv = [contig(layer.cross_attn.precompute_kv(enc_out)) for layer in self.layers]
        bert_kv = [
            contig(layer.bert_attn.precompute_kv(bert_out)) if layer.bert_attn is not None else None
            for layer in self.layers
        ]
        if all(kv is None for kv in bert_kv):
            bert_pad = None
        return DecoderState([KVCache() for _ in self.layers], cross_kv, bert_kv, src_pad, bert_pad)

    def forward(
        self,
        tok_emb: Tensor,  # (B, T, C) unscaled token embeddings
        enc_out: Tensor | None,  # (B, S, C)
        src_pad: Tensor | None,  # (B, S) bool
        bert_out: Tensor | None = None,  # (B, E, Hb)
        bert_pad: Tensor | None = None,  # (B, E) bool
        state: DecoderState | None = None,
    ) -> Tensor:
        T = tok_emb.size(1)
        start = state.step if state is not None else 0
        x = self.embed_scale * tok_emb + self.positions(T, start)  # (B, T, C)
        x = F.dropout(x, self.dropout, self.training)
        for i, layer in enumerate(self.layers):
            if state is None:
                x = layer(x, enc_out, src_pad, bert_out, bert_pad)
            else:
                x = layer(
                    x, None, state.src_pad, None, state.bert_pad,
                    cache=state.self_kv[i], cross_kv=state.cross_kv[i], bert_kv=state.bert_kv[i],
                )
        if state is not None:
            state.step += T
        if self.final_ln is not None:
            x = self.final_ln(x)
        return x  # (B, T, C)
