"""Tokenisers: the joint SentencePiece vocabulary of the NMT model and the pretrained encoder's own.

``SubwordVocab`` ids: pad 0, unk 1, bos 2, eos 3. ``EncoderTokenizer`` wraps ``AutoTokenizer`` and
adds the encoder's own special tokens (e.g. ``[CLS] ... [SEP]`` for BERT); a BERT model shipped with an
XLNet SentencePiece tokenizer (KoBERT) gets BERT's template through :mod:`bertnmt.data.spm_bert`.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import sentencepiece as spm

from bertnmt.data.spm_bert import bert_template_fix
from bertnmt.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
_MAX_SANE_LENGTH = 100_000  # HF uses a huge sentinel for "no limit"


def train_sentencepiece(
    texts: Sequence[str], vocab_size: int, model_prefix: str | Path, model_type: str = "unigram"
) -> Path:
    """Train a SentencePiece model on ``texts``; writes ``<model_prefix>.model`` (and ``.vocab``).

    Deterministic: every sentence is used in the given order. A ``vocab_size`` too large for a
    tiny corpus gives the largest vocabulary the text supports instead of failing.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("no non-empty sentences to train SentencePiece on")
    opts: dict[str, Any] = {}
    while True:
        try:
            proto = _train_once(texts, vocab_size, model_type, **opts)
            break
        except RuntimeError as e:
            msg = str(e)
            if "too high" in msg and "hard_vocab_limit" not in opts:
                opts["hard_vocab_limit"] = False
            elif "required_chars" in msg and "character_coverage" not in opts:
                opts["character_coverage"] = 0.9995
            else:
                reason = msg.strip().splitlines()[-1]
                raise ConfigError(f"data.vocab_size={vocab_size}: SentencePiece training failed: {reason}") from None
    sp = spm.SentencePieceProcessor(model_proto=proto)
    if opts:
        logger.info("SentencePiece: asked for %d pieces, made %d (%s)", vocab_size, sp.get_piece_size(), opts)
    path = Path(f"{model_prefix}.model")
    path.write_bytes(proto)
    pieces = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size()))
    Path(f"{model_prefix}.vocab").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return path


def _train_once(texts: list[str], vocab_size: int, model_type: str, **opts: Any) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,  # no file names end up inside the model: same input -> same bytes
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=SubwordVocab.pad_id,
        unk_id=SubwordVocab.unk_id,
        bos_id=SubwordVocab.bos_id,
        eos_id=SubwordVocab.eos_id,
        character_coverage=opts.pop("character_coverage", 1.0),
        normalization_rule_name="identity",  # text is NFC already; keeps decode(encode(x)) == x
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
        **opts,
    )
    return out.getvalue()


class SubwordVocab:
    """The joint source/target SentencePiece vocabulary."""

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            proto = self.path.read_bytes()
        except OSError as e:
            raise DataError(f"{self.path}: cannot read SentencePiece model ({e.strerror})") from None
        self.sha256 = hashlib.sha256(proto).hexdigest()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError:
            raise DataError(f"{self.path}: not a SentencePiece model") from None
        specials = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if specials != (self.pad_id, self.unk_id, self.bos_id, self.eos_id):
            raise DataError(f"{self.path}: special ids (pad, unk, bos, eos) are {specials}, expected (0, 1, 2, 3)")

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text``, without bos/eos."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many sentences at once (multi-threaded)."""
        return self._sp.encode(texts, out_type=int, num_threads=2)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first eos; pad, bos and unk ids are dropped."""
        if hasattr(ids, "tolist"):  # tensor or ndarray
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id, self.unk_id):
                out.append(int(i))
        return self._sp.decode(out)

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)


def resolve_model_path(path: str) -> str:
    """``pypi:<module>`` -> the folder from ``<module>.get_model_path()``; other paths unchanged.

    A path that looks local (``/``, ``.``, ``~``) must exist; anything else may be a hub name.
    """
    if path.startswith(PYPI_PREFIX):
        module_name = path[len(PYPI_PREFIX) :]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            pkg = module_name.replace("_", "-")
            msg = f"bert.path={path!r}: python package {module_name!r} is not installed (pip install {pkg})"
            raise ConfigError(msg) from None
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise ConfigError(f"bert.path={path!r}: module {module_name!r} has no get_model_path()")
        return str(getter())
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if path.startswith(("/", ".", "~")):
        raise ConfigError(f"bert.path={path!r}: folder not found")
    return path


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _load_auto_tokenizer(name_or_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if Path(resolved).is_dir():
        try:
            return AutoTokenizer.from_pretrained(resolved, **kwargs)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            msg = f"bert.path={name_or_path!r}: no tokenizer in {resolved} ({type(e).__name__}: {first})"
            raise ConfigError(msg) from None
    try:
        return AutoTokenizer.from_pretrained(resolved, local_files_only=True, **kwargs)
    except OSError:
        pass  # not in the local HF cache
    if not _hub_offline():
        try:
            return AutoTokenizer.from_pretrained(resolved, **kwargs)
        except OSError:
            pass
    raise ConfigError(
        f"encoder tokenizer {name_or_path!r} is not available offline; download it or set bert.path=/a/local/folder"
    )


# Models whose position ids start after the padding id (fairseq's convention), so that
# max_position_embeddings - (pad_token_id + 1) positions are usable.
_POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                          "roberta-prelayernorm", "mpnet", "bart", "mbart", "ibert")


def encoder_positions(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """How many tokens the encoder's position table holds (None when its config does not say or cannot be read)."""
    from transformers import AutoConfig

    try:
        resolved = resolve_model_path(name_or_path)
        local = Path(resolved).is_dir()
        conf = AutoConfig.from_pretrained(resolved, local_files_only=not local and _hub_offline(),
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ConfigError):
        return None
    n = getattr(conf, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(conf, "model_type", "") in _POSITION_OFFSET_TYPES and isinstance(getattr(conf, "pad_token_id", None), int):
        n -= conf.pad_token_id + 1
    return n


class EncoderTokenizer:
    """The pretrained encoder's own tokenizer (``AutoTokenizer``), with truncation counting."""

    def __init__(self, name_or_path: str, max_length: int = 512, trust_remote_code: bool = False):
        if max_length < 2:
            raise ConfigError(f"bert.max_length={max_length} must be at least 2")
        self.name = name_or_path
        self.hf = _load_auto_tokenizer(name_or_path, trust_remote_code)
        # KoBERT-style: a BERT model shipped with an XLNet SentencePiece tokenizer (see spm_bert.py)
        fixed = bert_template_fix(self.hf, resolve_model_path(name_or_path), name_or_path)
        if fixed is not None:
            self.hf = fixed
        model_max = getattr(self.hf, "model_max_length", None)
        sane = isinstance(model_max, int) and 2 <= model_max <= _MAX_SANE_LENGTH
        self.max_length = min(max_length, model_max) if sane else max_length
        positions = encoder_positions(name_or_path, trust_remote_code)
        if positions is not None and positions < self.max_length:  # a longer input would index past its positions
            logger.info("encoder %s has %d positions: inputs are truncated to %d tokens (bert.max_length=%d)",
                        name_or_path, positions, positions, max_length)
            self.max_length = max(2, positions)
        pad = self.hf.pad_token_id
        if pad is None:  # masked out anyway; any valid id will do
            pad = next((i for i in (self.hf.eos_token_id, self.hf.unk_token_id) if i is not None), 0)
        self.pad_id: int = int(pad)

    def __len__(self) -> int:
        return len(self.hf)

    @cached_property
    def vocab_sha256(self) -> str:
        """Hash of the token -> id table (part of the encoder-view cache key)."""
        vocab = sorted(self.hf.get_vocab().items())
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()

    def encode_batch(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Ids with the tokenizer's special tokens, truncated to ``max_length``; and how many were cut."""
        if not texts:
            return [], 0
        ids = self.hf(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        long = [i for i, seq in enumerate(ids) if len(seq) > self.max_length]
        if long:
            cut = self.hf(
                [texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=self.max_length
            )["input_ids"]
            for i, seq in zip(long, cut):
                ids[i] = seq
        return [list(seq) for seq in ids], len(long)
