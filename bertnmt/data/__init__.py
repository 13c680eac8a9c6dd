"""Data pipeline: corpora, tokenisers, cached preparation, token-budget batching, collation."""
from bertnmt.data.batching import TokenBatchSampler
from bertnmt.data.collate import Batch, PairDataset, collate, make_loader
from bertnmt.data.corpora import CORPORA, CorpusSpec, load_corpus
from bertnmt.data.prepare import PreparedData, Split, add_encoder_view, prepare_data
from bertnmt.data.tokenize import EncoderTokenizer, SubwordVocab, resolve_model_path, train_sentencepiece

__all__ = [
    "CORPORA",
    "Batch",
    "CorpusSpec",
    "EncoderTokenizer",
    "PairDataset",
    "PreparedData",
    "Split",
    "SubwordVocab",
    "TokenBatchSampler",
    "add_encoder_view",
    "collate",
    "load_corpus",
    "make_loader",
    "prepare_data",
    "resolve_model_path",
    "train_sentencepiece",
]
