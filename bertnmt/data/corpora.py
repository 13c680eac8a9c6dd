"""Corpus registry: where each corpus comes from, how to fetch, read, normalise and split it.

``load_corpus(cfg)`` returns raw sentence pairs per split (``train``/``valid``/``test``) in the
direction ``cfg.src_lang -> cfg.tgt_lang``, NFC-normalised, stripped, empty pairs dropped.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import unicodedata
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from bertnmt.core.atomic import write_bytes
from bertnmt.core.config import DataConfig
from bertnmt.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MIRROR_ENV = "BERTNMT_MIRROR"
_MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"

Pairs = tuple[list[str], list[str]]  # (source sentences, target sentences)


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file; ``path`` is its place inside the mirror (and the download cache)."""

    path: str
    url: str
    sha256: str
    member: str | None = None  # the file inside the zip archive at ``url``


@dataclass(frozen=True)
class CorpusSpec:
    """A registered corpus: either parallel files per split, or one tab-separated file."""

    name: str
    langs: tuple[str, ...]
    files: dict[str, RemoteFile] = field(default_factory=dict)  # file id -> file
    parallel: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> lang -> file id
    tsv: str | None = None  # file id of a one-file corpus (columns in ``langs`` order)


_MULTI30K_STEMS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}  # split -> upstream name
_MULTI30K_SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
}

CORPORA: dict[str, CorpusSpec] = {
    "multi30k_en_de": CorpusSpec(
        name="multi30k_en_de",
        langs=("en", "de"),
        files={
            name: RemoteFile(f"multi30k/{name}", _MULTI30K_URL + name, sha)
            for name, sha in _MULTI30K_SHA256.items()
        },
        parallel={
            split: {lang: f"{stem}.{lang}.gz" for lang in ("en", "de")} for split, stem in _MULTI30K_STEMS.items()
        },
    ),
    "tatoeba_en_ko": CorpusSpec(
        name="tatoeba_en_ko",
        langs=("en", "ko"),
        files={
            "kor": RemoteFile(
                "tatoeba-kor-eng/kor.txt",
                "https://www.manythings.org/anki/kor-eng.zip",
                "6c9d8de3e500306997e4083274fb0038ef521651ffb2b7923e4e607a59d09dbc",
                member="kor.txt",
            )
        },
        tsv="kor",
    ),
    "custom": CorpusSpec(name="custom", langs=()),
}


def corpus_spec(cfg: DataConfig) -> CorpusSpec:
    """The registered corpus named by ``cfg.corpus``, after checking the direction and the custom files."""
    spec = CORPORA.get(cfg.corpus)
    if spec is None:
        raise ConfigError(f"data.corpus={cfg.corpus!r} is unknown; choose one of {', '.join(CORPORA)}")
    if cfg.src_lang == cfg.tgt_lang:
        raise ConfigError(f"data.src_lang and data.tgt_lang are both {cfg.src_lang!r}")
    for key in ("src_lang", "tgt_lang"):
        lang = getattr(cfg, key)
        if spec.langs and lang not in spec.langs:
            raise ConfigError(f"data.{key}={lang!r} is not a language of {spec.name} ({', '.join(spec.langs)})")
    if spec.name == "custom":
        custom_files(cfg)
    return spec


def custom_files(cfg: DataConfig) -> dict[str, dict[str, Path]]:
    """``cfg.custom`` checked: every split present with exactly ``src`` and ``tgt`` paths."""
    if not cfg.custom:
        raise ConfigError("data.corpus=custom needs data.custom: {train,valid,test}: {src: PATH, tgt: PATH}")
    unknown = set(cfg.custom) - set(SPLITS)
    if unknown:
        raise ConfigError(f"data.custom.{sorted(unknown)[0]} is not a split; use {', '.join(SPLITS)}")
    out: dict[str, dict[str, Path]] = {}
    for split in SPLITS:
        sides = cfg.custom.get(split)
        if not sides or set(sides) != {"src", "tgt"}:
            raise ConfigError(f"data.custom.{split} must be {{src: PATH, tgt: PATH}}, got {sides!r}")
        out[split] = {side: Path(str(sides[side])).expanduser() for side in ("src", "tgt")}
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 mismatch, expected {expected}, got {actual}")


def mirror_dir(cfg: DataConfig) -> Path | None:
    """``cfg.mirror``, else env ``BERTNMT_MIRROR``, else None (download from upstream)."""
    folder = cfg.mirror or os.environ.get(MIRROR_ENV)
    return Path(folder).expanduser() if folder else None


def fetch(file: RemoteFile, cfg: DataConfig) -> Path:
    """A local, sha256-checked copy of ``file``: from the mirror, or downloaded into the cache."""
    mirror = mirror_dir(cfg)
    if mirror is not None:
        path = mirror / file.path
        if not path.is_file():
            raise DataError(f"{path}: corpus file not found in mirror {mirror}")
        _check_sha(path, file.sha256)
        return path
    dest = Path(cfg.cache_dir) / "downloads" / file.path
    if dest.is_file() and file_sha256(dest) == file.sha256:
        return dest
    logger.info("downloading %s", file.url)
    try:
        req = urllib.request.Request(file.url, headers={"User-Agent": "Mozilla/5.0 (bertnmt)"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            payload = resp.read()
        if file.member is not None:
            with zipfile.ZipFile(io.BytesIO(payload)) as zf:
                payload = zf.read(file.member)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"could not download {file.url} ({e}); set data.mirror or {MIRROR_ENV} to a local copy")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != file.sha256:
        raise DataError(f"{file.url}: sha256 mismatch, expected {file.sha256}, got {actual}")
    write_bytes(dest, payload)
    return dest


def normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (``.gz`` decompressed), not normalised.

    Line breaks are LF, CRLF or a lone CR (old Mac files): a file of CR-only line endings would
    otherwise be one line. Lone CRs are counted in a warning, since they change the line count.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(split_lines(data[: e.start].decode("utf-8", errors="replace"), path, warn=False))
        raise DataError(f"{path}: line {max(line, 1)} is not valid UTF-8 (byte {data[e.start]:#04x})") from None
    lines = split_lines(text.removeprefix("\ufeff"), path)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def split_lines(text: str, source: Path | str, warn: bool = True) -> list[str]:
    """``text`` split at LF, CRLF and lone CR; a warning counts the lone CRs read as line breaks."""
    text = text.replace("\r\n", "\n")
    lone = text.count("\r")
    if lone:
        if warn:
            logger.warning("%s: %d carriage return(s) without a line feed read as line breaks", source, lone)
        text = text.replace("\r", "\n")
    return text.split("\n")


class StreamLines:
    """Lines of a binary stream (stdin), decoded as UTF-8 one at a time, for translating as they come.

    Line breaks are those of :func:`read_lines`. Iteration stops before the first line that is not
    UTF-8 and keeps that :class:`~bertnmt.core.errors.DataError` in ``error`` (naming the line), so that
    the lines before it are still translated.
    """

    def __init__(self, stream: Iterable[bytes], name: str = "stdin") -> None:
        self.stream, self.name = stream, name
        self.error: DataError | None = None
        self.count = 0  # lines read so far

    def __iter__(self) -> Iterator[str]:
        warned = False
        for raw in self.stream:
            if raw.endswith(b"\r\n"):
                body = raw[:-2]
            elif raw.endswith((b"\n", b"\r")):  # a CR at the very end of the stream ends its last line
                body = raw[:-1]
            else:
                body = raw
            pieces = body.split(b"\r")  # UTF-8 never holds the byte 0x0d inside a character
            if len(pieces) > 1 and not warned:
                logger.warning("%s: carriage returns without a line feed read as line breaks (from line %d)",
                               self.name, self.count + 1)
                warned = True
            for piece in pieces:
                try:
                    line = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.error = DataError(f"{self.name}: line {self.count + 1} is not valid UTF-8 "
                                           f"(byte {piece[e.start]:#04x})")
                    return
                self.count += 1
                yield line.removeprefix("\ufeff") if self.count == 1 else line


def _read_parallel(src: Path, tgt: Path, scored: bool = False) -> tuple[Pairs, int]:
    """Aligned normalised pairs from two files; returns (pairs, number of empty pairs dropped).

    ``scored`` (valid, test): hypotheses are compared with these files line by line, so an empty
    line is refused, except empty lines on both sides at the end of the files.
    """
    src_lines, tgt_lines = read_lines(src), read_lines(tgt)
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"line counts differ: {src} has {len(src_lines)} lines, {tgt} has {len(tgt_lines)}")
    if scored:
        _check_no_gaps(src, tgt, src_lines, tgt_lines)
    pairs, empty = _drop_empty(src_lines, tgt_lines)
    if not pairs[0]:
        raise DataError(f"{src} and {tgt} hold no sentence pairs ({len(src_lines)} lines, all empty on one side or both)")
    return pairs, empty


def _check_no_gaps(src: Path, tgt: Path, src_lines: list[str], tgt_lines: list[str]) -> None:
    end = len(src_lines)
    while end and not src_lines[end - 1].strip() and not tgt_lines[end - 1].strip():
        end -= 1
    for n, (s, t) in enumerate(zip(src_lines[:end], tgt_lines[:end]), start=1):
        if not s.strip() or not t.strip():
            raise DataError(f"{src if not s.strip() else tgt}: line {n} is empty; the hypotheses of a valid or test "
                            "split must stay aligned with its lines, so remove the pair from both files")


def _drop_empty(src_lines: list[str], tgt_lines: list[str]) -> tuple[Pairs, int]:
    src_out, tgt_out = [], []
    for s, t in zip(src_lines, tgt_lines):
        s, t = normalise(s), normalise(t)
        if s and t:
            src_out.append(s)
            tgt_out.append(t)
    return (src_out, tgt_out), len(src_lines) - len(src_out)


def group_split(src: list[str], tgt: list[str], held: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Pair indices per split, so that no held-out source or target sentence occurs in another split.

    A one-file corpus such as Tatoeba holds several translations of one sentence (and one translation
    of several), so a split by pair would test on sentences seen in training. Pairs that share a source
    or a target are joined into groups (connected components); the groups, in an order drawn from
    ``seed``, fill ``held`` (split -> number of pairs, in order) and the rest is ``train``. A group that no
    longer fits a held-out split goes on to the next one, so the sizes are met whenever enough small
    groups remain. The result does not depend on the translation direction.
    """
    parent = list(range(len(src)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[int, str], int] = {}
    for i, pair in enumerate(zip(src, tgt)):
        for side, text in enumerate(pair):
            j = first.setdefault((side, text), i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(src)):
        groups.setdefault(root(i), []).append(i)
    ordered = list(groups.values())  # by each group's first pair
    out: dict[str, list[int]] = {name: [] for name in held}
    out["train"] = []
    for g in np.random.default_rng(seed).permutation(len(ordered)):
        members = ordered[g]
        name = next((n for n, size in held.items() if len(out[n]) + len(members) <= size), "train")
        out[name].extend(members)
    return out


def _read_tsv(path: Path, langs: tuple[str, ...], cfg: DataConfig) -> tuple[dict[str, Pairs], dict[str, int]]:
    """One tab-separated file split into train/valid/test by a permutation drawn from ``split_seed``."""
    columns: list[list[str]] = [[] for _ in langs]
    for n, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t") if line.strip() else [""] * len(langs)  # a blank line is an empty pair
        if len(fields) < len(langs):
            raise DataError(f"{path}: line {n} has {len(fields)} tab-separated fields, expected {len(langs)}")
        for col, value in zip(columns, fields):
            col.append(value)
    src_col, tgt_col = columns[langs.index(cfg.src_lang)], columns[langs.index(cfg.tgt_lang)]
    (src, tgt), empty = _drop_empty(src_col, tgt_col)
    if not src:
        raise DataError(f"{path} holds no sentence pairs")
    n_held = cfg.valid_size + cfg.test_size
    if cfg.valid_size < 0 or cfg.test_size < 0 or n_held >= len(src):
        raise ConfigError(
            f"data.valid_size={cfg.valid_size} and data.test_size={cfg.test_size} leave no training pairs "
            f"out of {len(src)} in {path}"
        )
    parts = group_split(src, tgt, {"test": cfg.test_size, "valid": cfg.valid_size}, cfg.split_seed)
    splits = {name: ([src[i] for i in idx], [tgt[i] for i in idx]) for name, idx in parts.items()}
    # Empty pairs are dropped before splitting, so they are all counted against train.
    return splits, {"train": empty, "valid": 0, "test": 0}


def load_corpus(cfg: DataConfig) -> tuple[dict[str, Pairs], dict[str, int]]:
    """Pairs per split in the configured direction, and the number of empty pairs dropped per split."""
    spec = corpus_spec(cfg)
    splits: dict[str, Pairs] = {}
    empty: dict[str, int] = {}
    if spec.name == "custom":
        for split, sides in custom_files(cfg).items():
            splits[split], empty[split] = _read_parallel(sides["src"], sides["tgt"], scored=split != "train")
    elif spec.tsv is not None:
        splits, empty = _read_tsv(fetch(spec.files[spec.tsv], cfg), spec.langs, cfg)
    else:
        local = {fid: fetch(f, cfg) for fid, f in spec.files.items()}
        for split, by_lang in spec.parallel.items():
            src, tgt = local[by_lang[cfg.src_lang]], local[by_lang[cfg.tgt_lang]]
            splits[split], empty[split] = _read_parallel(src, tgt, scored=split != "train")
    return {s: splits[s] for s in SPLITS}, {s: empty[s] for s in SPLITS}


def corpus_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """What identifies the input files: registered sha256s, or the content hashes of custom files."""
    spec = corpus_spec(cfg)
    if spec.name != "custom":
        return {f.path: f.sha256 for f in spec.files.values()}
    out = {}
    for split, sides in custom_files(cfg).items():
        for side, path in sides.items():
            if not path.is_file():
                raise DataError(f"{path}: file not found (data.custom.{split}.{side})")
            out[f"{split}.{side}"] = file_sha256(path)
    return out
