"""The BERT-fused NMT model (paper section 4)."""
from bertnmt.model.decoder import Decoder, DecoderState, FusedDecoderLayer
from bertnmt.model.encoder import Encoder, FusedEncoderLayer
from bertnmt.model.fusion import BertAttention, DropNet, FusedSublayer
from bertnmt.model.layer_mix import LayerMix
from bertnmt.model.layers import FeedForward, MultiheadAttention, SinusoidalPositions
from bertnmt.model.nmt import BertFusedTransformer, EncoderOut
from bertnmt.model.pretrained import PretrainedEncoder

__all__ = [
    "BertAttention",
    "BertFusedTransformer",
    "Decoder",
    "DecoderState",
    "DropNet",
    "Encoder",
    "EncoderOut",
    "FeedForward",
    "FusedDecoderLayer",
    "FusedEncoderLayer",
    "FusedSublayer",
    "LayerMix",
    "MultiheadAttention",
    "PretrainedEncoder",
    "SinusoidalPositions",
]
