"""BERT models whose vocabulary is a SentencePiece model shipped with an XLNet tokenizer class (KoBERT).

``skt/kobert-base-v1`` is a ``BertModel`` whose hub folder holds ``spiece.model`` and a
``tokenizer_config.json`` naming ``XLNetTokenizer``; its authors load it with their own
``KoBERTTokenizer`` (SKTBrain/KoBERT, ``kobert_hf``, installable from git only). Through
``AutoTokenizer`` the XLNet class gets it wrong in two ways:

- XLNet's template puts the special tokens at the end (``X [SEP] [CLS]``, padded on the left),
  not BERT's ``[CLS] X [SEP]`` that the model was pretrained with;
- the converted fast tokenizer decomposes text with NFKD before the SentencePiece model sees it,
  so every Hangul syllable becomes a jamo sequence and most Korean words come out as ``[UNK]``.

:class:`SentencePieceBertTokenizer` does what ``KoBERTTokenizer`` does, with the ``sentencepiece``
library on the same ``spiece.model``: XLNet's text preprocessing, SentencePiece pieces (with the
XLNet/ALBERT re-split of a number followed by a comma), and BERT's template. It has the small part
of the Hugging Face tokenizer interface that :class:`bertnmt.data.tokenize.EncoderTokenizer` uses.
"""
from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from typing import Any

import sentencepiece as spm

from bertnmt.core.errors import ConfigError

logger = logging.getLogger(__name__)

SPIECE_FILE = "spiece.model"
_WORD_START = "\u2581"  # SentencePiece's word-start mark


class SentencePieceBertTokenizer:
    """``[CLS] pieces [SEP]`` over a SentencePiece model whose pieces include BERT's special tokens."""

    def __init__(self, spiece: str | Path, *, cls_token: str = "[CLS]", sep_token: str = "[SEP]",
                 pad_token: str = "[PAD]", unk_token: str = "[UNK]", do_lower_case: bool = False,
                 remove_space: bool = True, keep_accents: bool = False, model_max_length: int = 512):
        self.path = Path(spiece)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError):
            raise ConfigError(f"{self.path}: not a SentencePiece model") from None
        self.do_lower_case, self.remove_space, self.keep_accents = do_lower_case, remove_space, keep_accents
        self.model_max_length = model_max_length
        self.cls_token_id = self._special(cls_token)
        self.sep_token_id = self.eos_token_id = self._special(sep_token)
        self.pad_token_id = self._special(pad_token)
        self.unk_token_id = self._special(unk_token)

    def _special(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise ConfigError(f"{self.path}: the SentencePiece model has no piece {piece!r}")
        return int(i)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(len(self))}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def preprocess(self, text: str) -> str:
        """XLNet's preprocessing (KoBERT keeps it): squeeze spaces, `` and '' to ", accents, case."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        text = text.replace("``", '"').replace("''", '"')
        if not self.keep_accents:  # SentencePiece's own NFKC recomposes what NFKD split (e.g. Hangul)
            text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        return text.lower() if self.do_lower_case else text

    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces; a piece ending in digit + comma ("1,") is split into number and comma."""
        out: list[str] = []
        for piece in self.sp.encode(self.preprocess(text), out_type=str):
            if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
                sub = self.sp.encode(piece[:-1].replace(_WORD_START, ""), out_type=str)
                if sub and piece[0] != _WORD_START and sub[0].startswith(_WORD_START):
                    sub = sub[1:] if len(sub[0]) == 1 else [sub[0][1:], *sub[1:]]
                out.extend([*sub, ","])
            else:
                out.append(piece)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids without special tokens."""
        return [int(self.sp.piece_to_id(p)) for p in self.tokenize(text)]

    def __call__(self, texts: list[str], add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, **_: Any) -> dict[str, list[list[int]]]:
        """``{"input_ids": [[CLS] ids [SEP], ...]}``, each at most ``max_length`` long when truncating."""
        out = []
        for text in texts:
            ids = self.encode(text)
            n_special = 2 if add_special_tokens else 0
            if truncation and max_length is not None:
                ids = ids[: max(0, max_length - n_special)]
            out.append([self.cls_token_id, *ids, self.sep_token_id] if add_special_tokens else ids)
        return {"input_ids": out}


def _model_type(resolved: str) -> str | None:
    """``model_type`` of the encoder's ``config.json`` (a local folder or the local HF cache)."""
    folder = Path(resolved)
    try:
        if folder.is_dir():
            return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolved, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def _spiece_path(resolved: str, hf: Any) -> Path | None:
    folder = Path(resolved)
    if folder.is_dir():
        path = folder / SPIECE_FILE
        return path if path.is_file() else None
    vocab_file = getattr(hf, "vocab_file", None) or getattr(hf, "init_kwargs", {}).get("vocab_file")
    if vocab_file and Path(vocab_file).is_file():
        return Path(vocab_file)
    try:
        from transformers.utils import cached_file

        found = cached_file(resolved, SPIECE_FILE, local_files_only=True)
        return Path(found) if found else None
    except OSError:
        return None


def bert_template_fix(hf: Any, resolved: str, name: str) -> SentencePieceBertTokenizer | None:
    """A :class:`SentencePieceBertTokenizer` when ``hf`` is an XLNet tokenizer loaded for a non-XLNet
    model (KoBERT); None otherwise (the Hugging Face tokenizer is right as it is)."""
    if not type(hf).__name__.startswith("XLNet"):
        return None
    model_type = _model_type(resolved)
    if model_type is None or model_type == "xlnet":
        return None
    spiece = _spiece_path(resolved, hf)
    if spiece is None:
        raise ConfigError(
            f"bert.path={name!r}: a {model_type} model with an XLNet tokenizer (KoBERT-style) needs its "
            f"{SPIECE_FILE}, which is not in {resolved}"
        )
    tok = SentencePieceBertTokenizer(
        spiece,
        cls_token=str(hf.cls_token), sep_token=str(hf.sep_token), pad_token=str(hf.pad_token),
        unk_token=str(hf.unk_token), do_lower_case=bool(getattr(hf, "do_lower_case", False)),
        remove_space=bool(getattr(hf, "remove_space", True)), keep_accents=bool(getattr(hf, "keep_accents", False)),
        model_max_length=int(getattr(hf, "model_max_length", 512) or 512),
    )
    logger.info("%s: %s model with an XLNet tokenizer: using SentencePiece %s with BERT's [CLS] x [SEP] "
                "(as KoBERTTokenizer does)", name, model_type, spiece)
    return tok
