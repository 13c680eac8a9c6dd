"""The NMT decoder with BERT-fused layers (paper section 4, eq. 3) and its incremental state, and its
ablation variants (section 6: stacked instead of averaged, fusion in a subset of layers)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertnmt.core.config import ModelConfig
from bertnmt.model.fusion import DropNet, add_fusion
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

    def expand(self, n: int) -> DecoderState:
        """Repeat every row ``n`` times in place (B -> B * n beams); the static K/V are shared."""
        index = torch.arange(self.batch_size, device=self.src_pad.device).repeat_interleave(n)
        for cache in self.self_kv:
            cache.reorder(index)
        self.group *= n
        return self

    def select(self, index: Tensor) -> DecoderState:
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

    def reorder_beams(self, index: Tensor) -> DecoderState:
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
    (w1, w2) come from drop-net (:class:`~bertnmt.model.fusion.FusedSublayer`, shared with the encoder;
    always (0.5, 0.5) at inference); a branch whose weight is 0 is not computed. ``drop_net``: the
    model's shared :class:`DropNet` (None: one of its own).

    ``model.fusion_combine=stacked`` (ablation, paper section 6): encoder-decoder attention, then
    BERT attention, each with its own residual and LayerNorm (``bert_attn_ln``), no drop-net.
    ``enc_dim``: the width of the encoder output when it is not ``d_model`` (``model.bert_input=replace``:
    the pretrained encoder is the NMT encoder).
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None, enc_dim: int | None = None,
                 drop_net: DropNet | None = None):
        super().__init__()
        C = cfg.d_model
        self.pre_ln = cfg.pre_ln
        self.self_attn = MultiheadAttention(C, cfg.heads, dropout=cfg.attn_dropout)
        self.self_attn_ln = LayerNorm(C)
        self.cross_attn = MultiheadAttention(C, cfg.heads, kdim=enc_dim, dropout=cfg.attn_dropout)
        self.cross_attn_ln = LayerNorm(C)
        add_fusion(self, cfg, bert_dim, drop_net)  # bert_attn, bert_attn_ln, stacked, fused
        self.ffn = FeedForward(C, cfg.ffn_dim, cfg.dropout, cfg.act_dropout)
        self.ffn_ln = LayerNorm(C)

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
        # 1. masked self-attention (causal; incremental with a cache)
        x = self.fused.residual(x, self.self_attn_ln,
                                lambda h: self.self_attn(h, causal=True, cache=cache))  # (B, T, C)

        # 2. encoder-decoder attention ‖ BERT attention, mixed by drop-net
        bert = None
        if self.bert_attn is not None:
            if bert_out is None and bert_kv is None:
                raise ValueError("this decoder layer is BERT-fused: pass bert_out (H_B)")
            bert = lambda h: self.bert_attn(h, bert_out, key_padding_mask=bert_pad, static_kv=bert_kv)  # noqa: E731
        x = self.fused(x, self.cross_attn_ln,
                       lambda h: self.cross_attn(h, enc_out, key_padding_mask=src_pad, static_kv=cross_kv),
                       bert, self.bert_attn_ln)  # (B, T, C)

        # 3. FFN
        if self.pre_ln:
            return x + self.ffn(self.ffn_ln(x))
        return self.ffn_ln(x + self.ffn(x))  # (B, T, C)


class Decoder(nn.Module):
    """Positions + dropout + a stack of :class:`FusedDecoderLayer` (+ final LN in pre-LN).

    Takes already embedded target tokens; returns hidden states (the output projection lives in
    the whole model). Full teacher-forced pass when ``state`` is None, else one incremental step.
    """

    def __init__(self, cfg: ModelConfig, bert_dim: int | None = None, enc_dim: int | None = None,
                 drop_net: DropNet | None = None):
        super().__init__()
        self.dropout = cfg.dropout
        self.embed_scale = math.sqrt(cfg.d_model)
        self.positions = SinusoidalPositions(cfg.d_model, cfg.max_positions)
        fuse = bert_dim if cfg.fused and cfg.fuse_decoder else None
        which = fused_layer_ids(cfg.fuse_layers, cfg.dec_layers)  # model.fuse_layers: all | first:K | last:K
        drop_net = drop_net or DropNet(cfg.drop_net)  # one stream of draws for all fused layers
        self.layers = nn.ModuleList(
            FusedDecoderLayer(cfg, fuse if i in which else None, enc_dim, drop_net) for i in range(cfg.dec_layers)
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
