"""Model FLOPs counted from the dimensions: the compute floor that ``scripts/bench.py`` compares against.

Only matrix products count (2 FLOPs per multiply-add), as in the usual MFU accounting; layer norms,
softmax and embeddings lookups are ignored. Attention counts the full score matrix (QK^T and AV)
of every layer. A training step costs 3x the forward pass for trained computation (forward, input
gradients, weight gradients) and 1x for a frozen encoder run without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

from bertnmt.core.config import ModelConfig


@dataclass(frozen=True)
class EncoderDims:
    """The pretrained encoder's shape (a BERT-like stack)."""

    hidden: int
    layers: int
    ffn: int

    @classmethod
    def from_hf(cls, config) -> "EncoderDims":
        return cls(int(config.hidden_size), int(config.num_hidden_layers), int(config.intermediate_size))


def _attention(B: int, Tq: int, Tk: int, C: int, kdim: int) -> int:
    """q/out projections on Tq rows, k/v projections from width ``kdim`` on Tk rows, scores and mixing."""
    return 2 * B * Tq * C * C * 2 + 2 * B * Tk * kdim * C * 2 + 2 * B * Tq * Tk * C * 2


def nmt_forward_flops(cfg: ModelConfig, vocab: int, B: int, S: int, T: int, E: int = 0, bert_dim: int = 0,
                      fused: bool | None = None) -> int:
    """Forward FLOPs of the NMT part for a batch of B sentences, padded lengths S (source), T (target),
    E (pretrained-encoder tokens, for the BERT attention of a fused model; paper section 4)."""
    C, F = cfg.d_model, cfg.ffn_dim
    fused = cfg.fused if fused is None else fused
    enc_bert = fused and cfg.fuse_encoder and E > 0
    dec_bert = fused and cfg.fuse_decoder and E > 0
    enc = _attention(B, S, S, C, C) + 2 * B * S * C * F * 2  # (B, S, C) self-attention + FFN
    if enc_bert:
        enc += _attention(B, S, E, C, bert_dim)
    dec = _attention(B, T, T, C, C) + _attention(B, T, S, C, C) + 2 * B * T * C * F * 2
    if dec_bert:
        dec += _attention(B, T, E, C, bert_dim)
    return cfg.enc_layers * enc + cfg.dec_layers * dec + 2 * B * T * C * vocab  # + output projection


def encoder_forward_flops(dims: EncoderDims, B: int, E: int) -> int:
    """Forward FLOPs of a BERT-like pretrained encoder on a (B, E) batch."""
    H = dims.hidden
    return dims.layers * (_attention(B, E, E, H, H) + 2 * B * E * H * dims.ffn * 2)


@dataclass
class StepFlops:
    """FLOPs of one training step of each variant bench.py measures."""

    plain: int  # plain Transformer, fwd + bwd
    fused_cached: int  # fused, frozen encoder, features cached: NMT fwd + bwd only
    fused_live: int  # + the frozen encoder's forward
    fused_finetune: int  # + the encoder's forward and backward

    def floors(self) -> dict[str, float]:
        """The compute floor of each fused variant: its FLOPs over the plain model's."""
        return {"fused_cached": self.fused_cached / self.plain, "fused_live": self.fused_live / self.plain,
                "fused_finetune": self.fused_finetune / self.plain}


def training_flops(cfg: ModelConfig, vocab: int, shapes: list[tuple[int, int, int, int]], dims: EncoderDims) -> StepFlops:
    """Summed over batches of shapes (B, S, T, E)."""
    plain = fused = bert = 0
    for B, S, T, E in shapes:
        plain += 3 * nmt_forward_flops(cfg, vocab, B, S, T, fused=False)
        fused += 3 * nmt_forward_flops(cfg, vocab, B, S, T, E, dims.hidden, fused=True)
        bert += encoder_forward_flops(dims, B, E)
    return StepFlops(plain, fused, fused + bert, fused + 3 * bert)


def beam_decode_flops(cfg: ModelConfig, vocab: int, B: int, S: int, E: int, beam: int, steps: int,
                      bert_dim: int = 0, fused: bool = False) -> int:
    """FLOPs of batched incremental beam search: the encoder once, the static keys/values once per
    sentence (shared by its beams), then ``steps`` decoder steps on B * beam rows (paper section 4 for
    the BERT attention; the pretrained encoder's own forward is :func:`encoder_forward_flops`)."""
    C, F = cfg.d_model, cfg.ffn_dim
    N = B * beam
    dec_bert = fused and cfg.fuse_decoder and E > 0
    # with T = 0: the encoder, plus every decoder layer's static keys/values (encoder and BERT memories)
    total = nmt_forward_flops(cfg, vocab, B, S, 0, E, bert_dim, fused=fused)
    for t in range(1, steps + 1):
        layer = 2 * N * C * 3 * C + 2 * N * C * C + 2 * N * t * C * 2  # self-attention: q, k, v, out; scores
        layer += 2 * N * C * C * 2 + 2 * N * S * C * 2  # encoder-decoder attention: q, out; scores
        if dec_bert:
            layer += 2 * N * C * C * 2 + 2 * N * E * C * 2  # BERT attention: q, out; scores
        layer += 2 * N * C * F * 2  # FFN
        total += cfg.dec_layers * layer + 2 * N * C * vocab  # + output projection
    return total

