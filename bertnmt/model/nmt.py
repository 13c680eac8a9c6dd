"""The whole BERT-fused NMT model (paper section 4): embeddings, encoder, decoder, output layer;
and the ways H_B can enter it in the ablations (``model.bert_input``, ``bert.layer_mix``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertnmt.core.config import BertInput, ModelConfig
from bertnmt.model.decoder import Decoder, DecoderState
from bertnmt.model.encoder import Encoder
from bertnmt.model.fusion import DropNet
from bertnmt.model.layer_mix import LayerMix
from bertnmt.model.pretrained import PretrainedEncoder
from bertnmt.model.variants import check_model_config


@dataclass
class EncoderOut:
    """What the decoder attends to: H_E and (when fused) H_B, with their padding masks."""

    enc_out: Tensor  # (B, S, C) H_E
    src_pad: Tensor  # (B, S) bool, True = pad
    bert_out: Tensor | None = None  # (B, E, Hb) H_B
    bert_pad: Tensor | None = None  # (B, E) bool, True = pad


class BertFusedTransformer(nn.Module):
    """Transformer NMT whose encoder and decoder layers also attend to H_B (paper section 4).

    ``fused=False`` gives the plain Transformer of the warm start (paper section 5): no
    ``bert_attn`` modules and no ``bert``. All other parameter names are identical, so a plain
    state dict loads into a fused model with ``strict=False`` and only ``*.bert_attn.*`` and
    ``bert.*`` keys missing.

    Ablation variants (paper sections 3 and 6), all with ``fused=True``:

    * ``model.bert_input=embedding`` (feature-based): ``bert_proj`` (Linear H -> C) maps H_B to the NMT
      encoder's input embeddings; the encoder runs over the pretrained encoder's tokens; no BERT attention.
    * ``model.bert_input=replace``: no NMT encoder (``encoder`` is None); the decoder attends to H_B
      (cross-attention key width H); no BERT attention. Fine-tune the encoder (``freeze=finetune``).
    * ``bert.layer_mix=true``: H_B = ``bert_mix`` (a trainable :class:`LayerMix`) of all hidden states.

    The NMT modules a plain Transformer lacks (:data:`bertnmt.model.fusion.FUSION_MODULES`: ``bert_attn``,
    ``bert_attn_ln``, ``bert_mix``, ``bert_proj``) form the report group "fusion"; a warm start may leave them new.
    The fused layers share one :class:`~bertnmt.model.fusion.DropNet`, whose generator state is in the state dict
    (``*.fused.drop_net._extra_state``, one copy per fused layer).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, bert: PretrainedEncoder | None):
        super().__init__()
        check_model_config(cfg)
        self.cfg, self.vocab_size, self.pad_id = cfg, vocab_size, pad_id
        self.bert_input = cfg.bert_input if cfg.fused else BertInput.fused
        self.uses_bert = cfg.fused and (cfg.fuse_encoder or cfg.fuse_decoder or self.bert_input != BertInput.fused)
        if self.uses_bert and bert is None:
            raise ValueError("model.fused=true needs a PretrainedEncoder (bert)")
        self.bert = bert if self.uses_bert else None
        H = bert.hidden_size if self.bert is not None else None
        bert_dim = H if self.bert_input == BertInput.fused else None  # the width of BERT attention's keys, or no fusion
        self.bert_mix = LayerMix(bert.n_states) if self.bert is not None and bert.layer_mix else None

        C = cfg.d_model
        self.embed_tokens = self._embedding(vocab_size, C, pad_id)
        self.bert_proj = None
        if self.bert_input == BertInput.embedding:  # H_B -> input embeddings, scaled like token embeddings (std C^-0.5)
            self.bert_proj = nn.Linear(H, C)
            nn.init.normal_(self.bert_proj.weight, mean=0.0, std=(H * C) ** -0.5)
            nn.init.zeros_(self.bert_proj.bias)
        drop_net = DropNet(cfg.drop_net)  # one stream of drop-net draws, shared by every fused layer
        self.encoder = Encoder(cfg, bert_dim, drop_net) if self.bert_input != "replace" else None
        self.decoder = Decoder(cfg, bert_dim, enc_dim=H if self.bert_input == "replace" else None, drop_net=drop_net)
        if cfg.share_embeddings:
            self.decoder_embed_tokens = None
            self.output_projection = None
        else:
            self.decoder_embed_tokens = self._embedding(vocab_size, C, pad_id)
            self.output_projection = nn.Linear(C, vocab_size, bias=False)
            nn.init.normal_(self.output_projection.weight, mean=0.0, std=C**-0.5)

    @staticmethod
    def _embedding(vocab_size: int, dim: int, pad_id: int) -> nn.Embedding:
        emb = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        nn.init.normal_(emb.weight, mean=0.0, std=dim**-0.5)  # fairseq
        nn.init.zeros_(emb.weight[pad_id])
        return emb

    # ------------------------------------------------------------------ encoder side
    @property
    def features_cacheable(self) -> bool:
        """Whether H_B depends on the pretrained encoder's weights alone (no trainable ``bert_mix``): then,
        while the freeze policy keeps the encoder frozen, H_B can be computed once per sentence and cached."""
        return self.bert is not None and self.bert_mix is None

    def bert_features(self, bert_ids: Tensor, bert_mask: Tensor) -> tuple[Tensor, Tensor]:
        """H_B (B, E, Hb) from the pretrained encoder, and its padding mask (B, E) True = pad."""
        if self.bert is None:
            raise ValueError("this model is not BERT-fused")
        if self.bert_mix is not None:
            return self.bert_mix(self.bert.all_layers(bert_ids, bert_mask)), bert_mask.eq(0)
        return self.bert(bert_ids, bert_mask), bert_mask.eq(0)

    def encode(
        self,
        src: Tensor,  # (B, S) long, right-padded
        bert_ids: Tensor | None = None,  # (B, E) long, the pretrained encoder's ids
        bert_mask: Tensor | None = None,  # (B, E) 1 = real
        bert_features: tuple[Tensor, Tensor] | None = None,  # precomputed (H_B (B, E, Hb), its pad mask (B, E))
    ) -> EncoderOut:
        """Run BERT (when fused) and the NMT encoder (paper eq. 1).

        bert_input=embedding / replace: the decoder's memory is over the pretrained encoder's tokens
        (``src_pad`` is then its padding mask (B, E)) and there is no H_B for BERT attention.
        """
        src_pad = src.eq(self.pad_id)  # (B, S)
        h_b = b_pad = None
        if self.uses_bert:
            if bert_features is not None:
                h_b, b_pad = bert_features
            elif bert_ids is None or bert_mask is None:
                raise ValueError("a BERT-fused model needs bert_ids and bert_mask (or bert_features)")
            else:
                h_b, b_pad = self.bert_features(bert_ids, bert_mask)
        if self.bert_input == "embedding":  # feature-based (paper section 3): H_B as input embeddings
            enc_out = self.encoder(self.bert_proj(h_b), b_pad)  # (B, E, C)
            return EncoderOut(enc_out, b_pad)
        if self.bert_input == BertInput.replace:  # the pretrained encoder is the NMT encoder (paper section 3)
            return EncoderOut(h_b, b_pad)  # (B, E, H)
        enc_out = self.encoder(self.embed_tokens(src), src_pad, h_b, b_pad)  # (B, S, C)
        return EncoderOut(enc_out, src_pad, h_b, b_pad)

    # ------------------------------------------------------------------ decoder side
    @property
    def output_weight(self) -> Tensor:
        """The output layer's weight (V, C): the shared embeddings, or the output projection's."""
        return self.embed_tokens.weight if self.output_projection is None else self.output_projection.weight

    def _output(self, x: Tensor) -> Tensor:
        return F.linear(x, self.output_weight)  # (B, T, V)

    def init_decoder_state(self, enc: EncoderOut) -> DecoderState:
        """Incremental-decoding state; static cross/BERT keys and values are computed here once."""
        return self.decoder.init_state(enc.enc_out, enc.src_pad, enc.bert_out, enc.bert_pad)

    def decode(self, tgt_in: Tensor, enc: EncoderOut | None, state: DecoderState | None = None,
               keep: Tensor | None = None, features_only: bool = False) -> Tensor:
        """Logits (B, T, V) for ``tgt_in`` (B, T) (paper eq. 3).

        state=None: teacher-forced full pass over ``tgt_in``. With a state: incremental step,
        ``tgt_in`` holds only the newest token(s) (B, 1); masks and keys come from the state
        (``enc`` may be None) and the state advances. ``keep``: return only some positions' logits (N, V),
        skipping the output layer at padding (training): a (B, T) bool mask, or (N,) long flat indexes
        ``row * T + t`` (a fixed-size gather, no host sync; see ``Batch.out_idx``). ``features_only``: the
        decoder's output before the output layer, (B, T, C) or (N, C) (the training loss applies that layer).
        """
        embed = self.embed_tokens if self.decoder_embed_tokens is None else self.decoder_embed_tokens
        tok = embed(tgt_in)  # (B, T, C)
        if state is None:
            if enc is None:
                raise ValueError("decode() without a state needs the encoder output")
            x = self.decoder(tok, enc.enc_out, enc.src_pad, enc.bert_out, enc.bert_pad)
        else:
            x = self.decoder(tok, None, None, state=state)
        if keep is not None and keep.dtype == torch.bool:
            x = x[keep]  # (N, C); a data-dependent shape: the host waits for the device on a GPU
        elif keep is not None:
            x = x.flatten(0, 1).index_select(0, keep)  # (N', C): a fixed-size gather of flat positions
        return x if features_only else self._output(x)  # (B, T, V), or (N, V) with keep

    def forward(
        self,
        src: Tensor,  # (B, S)
        tgt_in: Tensor,  # (B, T) bos + target
        bert_ids: Tensor | None = None,  # (B, E)
        bert_mask: Tensor | None = None,  # (B, E)
        bert_features: tuple[Tensor, Tensor] | None = None,  # precomputed (H_B, its pad mask)
        keep: Tensor | None = None,  # (B, T) bool, or (N',) long flat positions: logits only there -> (N, V)
        features_only: bool = False,  # the decoder's output (B, T, C) instead of the logits
    ) -> Tensor:
        enc = self.encode(src, bert_ids, bert_mask, bert_features)
        return self.decode(tgt_in, enc, keep=keep, features_only=features_only)  # (B, T, V)

    def nmt_state_dict(self) -> dict[str, Tensor]:
        """The state dict without the pretrained encoder's ``bert.*`` weights (for checkpoints)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("bert.")}
