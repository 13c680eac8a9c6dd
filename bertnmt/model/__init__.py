"""The BERT-fused NMT model (paper section 4)."""
from bertnmt.model.decoder import Decoder, DecoderState, FusedDecoderLayer
from bertnmt.model.encoder import Encoder, FusedEncoderLayer
from bertnmt.model.fusion import BertAttention, drop_net_weights
from bertnmt.model.layer_mix import LayerMix
from bertnmt.model.layers import FeedForward, MultiheadAttention, SinusoidalPositions
from bertnmt.model.nmt import BertFusedTransformer, EncoderOut
from bertnmt.model.pretrained import PretrainedEncoder

__all__ = [
    "BertAttention",
    "BertFusedTransformer",
    "Decoder",
    "DecoderState",
    "Encoder",
    "EncoderOut",
    "FeedForward",
    "FusedDecoderLayer",
    "FusedEncoderLayer",
    "LayerMix",
    "MultiheadAttention",
    "PretrainedEncoder",
    "SinusoidalPositions",
    "drop_net_weights",
]
