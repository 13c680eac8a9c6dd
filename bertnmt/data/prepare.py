"""``prepare_data``: the cached, SentencePiece-tokenised corpus; ``add_encoder_view``: encoder ids.

Cache layout, ``<cache_dir>/<corpus>-<src>-<tgt>-<key>/``::

    spm.model, spm.vocab                  joint SentencePiece model (trained on train only)
    <split>.{src,tgt}.txt                 normalised sentences, one per line
    <split>.{src,tgt}.ids.npy             all ids of the split, flat int32 (no bos/eos)
    <split>.{src,tgt}.offsets.npy         int64, n + 1 offsets into the flat array
    report.json                           counts and settings
    enc-<key>/<split>.{ids,offsets}.npy   encoder ids (``add_encoder_view``), meta.json

Every folder is written under a temporary name and renamed when complete (:func:`bertnmt.core.atomic.atomic_dir`);
the temp folders of killed builds are removed by the next build.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertnmt.core.atomic import atomic_dir, remove_stale_temps
from bertnmt.core.config import DataConfig
from bertnmt.data.corpora import SPLITS, corpus_fingerprint, corpus_spec, load_corpus
from bertnmt.data.tokenize import EncoderTokenizer, SubwordVocab, train_sentencepiece
from bertnmt.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PREP_VERSION = 1  # bump when the preparation changes what it produces


@dataclass
class Split:
    name: str  # "train" | "valid" | "test"
    src_text: list[str]  # normalised source sentences (NFC, stripped)
    tgt_text: list[str]  # normalised target sentences (the BLEU references)
    src_ids: list[np.ndarray]  # SentencePiece ids, int32, without bos/eos
    tgt_ids: list[np.ndarray]  # SentencePiece ids, int32, without bos/eos
    enc_ids: list[np.ndarray] | None = None  # encoder ids incl. its special tokens, truncated

    def __len__(self) -> int:
        return len(self.src_text)


@dataclass
class PreparedData:
    key: str  # hash of inputs + settings (names the cache folder)
    dir: Path  # <cache_dir>/<corpus>-<src>-<tgt>-<key>/
    vocab: SubwordVocab
    splits: dict[str, Split]  # "train", "valid", "test"
    report: dict[str, Any]  # counts: pairs per split, dropped empty, dropped too long, ...


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """The DataConfig fields that change the prepared data."""
    keys = ["corpus", "src_lang", "tgt_lang", "vocab_size", "max_len", "train_limit", "valid_limit", "test_limit"]
    if corpus_spec(cfg).tsv is not None:
        keys += ["split_seed", "valid_size", "test_size"]
    out = {k: getattr(cfg, k) for k in keys}
    if corpus_spec(cfg).tsv is not None:
        out["split"] = "grouped"  # corpora.group_split: no held-out sentence in training (earlier caches split by pair)
    return out


def _check(cfg: DataConfig) -> None:
    if cfg.vocab_size < 5:
        raise ConfigError(f"data.vocab_size={cfg.vocab_size} must be at least 5")
    if cfg.max_len < 1:
        raise ConfigError(f"data.max_len={cfg.max_len} must be at least 1")
    for split in SPLITS:
        limit = getattr(cfg, f"{split}_limit")
        if limit is not None and limit < (0 if split == "test" else 1):  # training and validation need a pair
            raise ConfigError(f"data.{split}_limit={limit} is too small")


def _identity(cfg: DataConfig) -> dict[str, Any]:
    """Everything the prepared data depends on (hashed into the cache key)."""
    _check(cfg)
    return {"prep_version": PREP_VERSION, "inputs": corpus_fingerprint(cfg), "settings": _settings(cfg)}


def cache_folder(cfg: DataConfig) -> tuple[str, Path]:
    """(key, folder) of the prepared data for ``cfg``; reads custom files to hash them."""
    key = _short_hash(_identity(cfg))
    return key, _folder(cfg, key)


def _folder(cfg: DataConfig, key: str) -> Path:
    return Path(cfg.cache_dir).resolve() / f"{cfg.corpus}-{cfg.src_lang}-{cfg.tgt_lang}-{key}"


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Read, normalise, limit, tokenise and cache the corpus; load it from the cache when present."""
    identity = _identity(cfg)
    key = _short_hash(identity)
    out = _folder(cfg, key)
    _remove_stale(out.parent)
    if out.is_dir():
        data = _load(out, key)
        logger.info("loaded prepared data from %s", out)
        return data
    raw, empty = load_corpus(cfg)
    report: dict[str, Any] = {
        "key": key,
        **identity,
        "pairs": {},
        "dropped_empty": empty,
        "cut_by_limit": {},
        "dropped_too_long": {},
    }
    for split in SPLITS:
        limit = getattr(cfg, f"{split}_limit")
        src, tgt = raw[split]
        report["cut_by_limit"][split] = max(0, len(src) - limit) if limit is not None else 0
        if limit is not None:
            raw[split] = (src[:limit], tgt[:limit])
    with atomic_dir(out) as tmp:
        train_src, train_tgt = raw["train"]
        vocab = SubwordVocab(train_sentencepiece(train_src + train_tgt, cfg.vocab_size, tmp / "spm"))
        report["vocab_size"] = len(vocab)
        for split in SPLITS:
            src, tgt = raw[split]
            src_ids, tgt_ids = vocab.encode_batch(src), vocab.encode_batch(tgt)
            keep = list(range(len(src)))
            if split == "train":
                keep = [i for i in keep if len(src_ids[i]) <= cfg.max_len and len(tgt_ids[i]) <= cfg.max_len]
            report["dropped_too_long"][split] = len(src) - len(keep)
            report["pairs"][split] = len(keep)
            _write_texts(tmp / f"{split}.src.txt", [src[i] for i in keep])
            _write_texts(tmp / f"{split}.tgt.txt", [tgt[i] for i in keep])
            save_ragged(tmp / f"{split}.src", [src_ids[i] for i in keep])
            save_ragged(tmp / f"{split}.tgt", [tgt_ids[i] for i in keep])
        if report["pairs"]["train"] == 0:
            raise ConfigError(f"data.max_len={cfg.max_len} drops every training pair")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    data = _load(out, key)
    _log_report(cfg, data)
    return data


def _log_report(cfg: DataConfig, data: PreparedData) -> None:
    r = data.report
    logger.info(
        "prepared %s %s->%s in %s: pairs %s; dropped empty %s, too long %s, beyond limits %s; vocab %d",
        cfg.corpus, cfg.src_lang, cfg.tgt_lang, data.dir, r["pairs"], r["dropped_empty"],
        r["dropped_too_long"], r["cut_by_limit"], r["vocab_size"],
    )
    if sum(r["dropped_too_long"].values()):
        logger.warning("%d training pairs longer than data.max_len=%d pieces were dropped",
                       sum(r["dropped_too_long"].values()), cfg.max_len)
    for split in ("valid", "test"):
        if r["pairs"][split] == 0:
            logger.warning("the %s split of %s is empty", split, cfg.corpus)


def _load(out: Path, key: str) -> PreparedData:
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        vocab = SubwordVocab(out / "spm.model")
        splits = {}
        for name in SPLITS:
            split = Split(
                name=name,
                src_text=_read_texts(out / f"{name}.src.txt"),
                tgt_text=_read_texts(out / f"{name}.tgt.txt"),
                src_ids=load_ragged(out / f"{name}.src"),
                tgt_ids=load_ragged(out / f"{name}.tgt"),
            )
            sizes = {len(split.src_text), len(split.tgt_text), len(split.src_ids), len(split.tgt_ids)}
            if sizes != {report["pairs"][name]}:
                raise ValueError(f"{name} split has inconsistent sizes {sorted(sizes)}")
            splits[name] = split
    except (OSError, ValueError, KeyError, DataError) as e:
        raise DataError(f"{out}: prepared data cache is incomplete or corrupt ({e}); delete it to rebuild") from None
    return PreparedData(key=key, dir=out, vocab=vocab, splits=splits, report=report)


def add_encoder_view(data: PreparedData, tokenizer: EncoderTokenizer) -> None:
    """Fill ``split.enc_ids`` for every split with the encoder tokenizer's ids of the source (cached)."""
    fingerprint = {
        "name": tokenizer.name,
        "class": type(tokenizer.hf).__name__,
        "vocab": tokenizer.vocab_sha256,
        "max_length": tokenizer.max_length,
        "version": PREP_VERSION,
    }
    folder = data.dir / f"enc-{_short_hash(fingerprint)}"
    _remove_stale(data.dir)
    if not folder.is_dir():
        with atomic_dir(folder) as tmp:
            truncated = {}
            for name, split in data.splits.items():
                ids, truncated[name] = tokenizer.encode_batch(split.src_text)
                save_ragged(tmp / name, ids)
            meta = {**fingerprint, "truncated": truncated}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    try:
        truncated = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["truncated"]
        for name, split in data.splits.items():
            enc = load_ragged(folder / name)
            if len(enc) != len(split):
                raise ValueError(f"{name} has {len(enc)} encoder sequences for {len(split)} sentences")
            split.enc_ids = enc
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{folder}: encoder-id cache is incomplete or corrupt ({e}); delete it to rebuild") from None
    data.report["encoder_truncated"] = truncated
    if sum(truncated.values()):
        logger.warning(
            "%d source sentences were truncated to the encoder's max_length=%d (%s)",
            sum(truncated.values()), tokenizer.max_length, truncated,
        )


def save_ragged(stem: Path, seqs: list[Any]) -> None:
    """Write int sequences as ``<stem>.ids.npy`` (flat int32) and ``<stem>.offsets.npy`` (n + 1)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for s in seqs for i in s), dtype=np.int32, count=int(offsets[-1]))
    np.save(stem.with_name(stem.name + ".ids.npy"), flat, allow_pickle=False)
    np.save(stem.with_name(stem.name + ".offsets.npy"), offsets, allow_pickle=False)


def load_ragged(stem: Path) -> list[np.ndarray]:
    """Inverse of :func:`save_ragged`: a list of int32 arrays (views of one flat array)."""
    flat = np.load(stem.with_name(stem.name + ".ids.npy"), allow_pickle=False)
    offsets = np.load(stem.with_name(stem.name + ".offsets.npy"), allow_pickle=False)
    if flat.dtype != np.int32 or offsets.ndim != 1 or len(offsets) == 0 or offsets[-1] != len(flat):
        raise ValueError(f"{stem}: ids and offsets do not match")
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _write_texts(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.writelines(t + "\n" for t in texts)


def _read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read().split("\n")[:-1]


def _remove_stale(folder: Path) -> None:
    """The temp folders of cache builds that a kill interrupted (their process is gone)."""
    for p in remove_stale_temps(folder):
        logger.info("removed %s, left by an interrupted cache build", p)
