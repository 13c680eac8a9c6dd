"""Corpus-level BLEU and chrF through sacreBLEU, always with their signatures.

Hypotheses must be detokenised text (SentencePiece ``decode``) with no ``<unk>`` pieces:
sacreBLEU would split ``<unk>`` into ``< unk >`` and inflate the score.

By default BLEU is sacreBLEU's standard: case-sensitive, its own tokenizer for the target language
(``13a``; ``zh``; ``ko-mecab`` / ``ja-mecab`` where installed). :func:`paper_options` reproduces how
the paper's IWSLT'14 numbers were computed (fairseq's BLEU on the Moses-tokenised, lowercased text
of its data preparation): hypotheses and references are Moses-tokenised with ``sacremoses``, then
scored by sacreBLEU with ``tokenize='none', lowercase=True``. :meth:`BleuOptions.describe` states
the options in words next to every score that is not the default.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache

from sacrebleu.metrics import BLEU, CHRF

from bertnmt.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Score:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=None)
def bleu_tokenizer_for(lang: str) -> str:
    """sacreBLEU's tokenizer for a target language (its own defaults; Korean needs ``sacrebleu[ko]``).

    Korean and Japanese use MeCab (``ko-mecab`` / ``ja-mecab``) when it is installed; otherwise
    ``char`` with a warning (logged once per language).
    """
    if lang == "zh":
        return "zh"
    if lang in ("ja", "ko"):
        name = f"{lang}-mecab"
        try:
            BLEU(tokenize=name).corpus_score(["a"], [["a"]])
            return name
        except (RuntimeError, ImportError, OSError, AssertionError):
            log.warning("sacreBLEU's %s tokenizer is not installed (pip install sacrebleu[%s]); using 'char'", name, lang)
            return "char"
    return "13a"


@dataclass(frozen=True)
class BleuOptions:
    """How BLEU is computed: sacreBLEU's tokenizer and case, after optional Moses tokenisation."""

    tokenize: str = "13a"
    lowercase: bool = False
    moses_lang: str | None = None  # Moses-tokenise hypotheses and references first (paper style)

    def describe(self) -> str:
        case = "case-insensitive (lowercase=True)" if self.lowercase else "case-sensitive"
        if self.moses_lang is None:
            return f"sacreBLEU on detokenised text: tokenize={self.tokenize!r}, {case}"
        import sacremoses

        return (f"paper style (fairseq BLEU on Moses-tokenised, lowercased text): hypotheses and references "
                f"Moses-tokenised by sacremoses {sacremoses.__version__} (lang={self.moses_lang!r}, escape=False, "
                f"no aggressive hyphen splitting), then sacreBLEU tokenize={self.tokenize!r}, {case}")

    def preprocess(self, texts: list[str]) -> list[str]:
        if self.moses_lang is None:
            return texts
        tok = _moses(self.moses_lang)
        return [tok.tokenize(t, escape=False, return_str=True) for t in texts]


@lru_cache(maxsize=None)
def _moses(lang: str):
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang=lang)


def default_options(tgt_lang: str, lowercase: bool = False) -> BleuOptions:
    return BleuOptions(tokenize=bleu_tokenizer_for(tgt_lang), lowercase=lowercase)


def paper_options(tgt_lang: str) -> BleuOptions:
    """The paper's IWSLT'14 scoring: case-insensitive BLEU on Moses-tokenised text.

    Chinese, Japanese and Korean have no Moses tokenisation: their sacreBLEU tokenizer, lowercased.
    """
    if tgt_lang in ("zh", "ja", "ko"):
        return BleuOptions(tokenize=bleu_tokenizer_for(tgt_lang), lowercase=True)
    try:
        import sacremoses  # noqa: F401
    except ImportError:
        raise ConfigError("paper-style BLEU needs sacremoses (pip install sacremoses)") from None
    return BleuOptions(tokenize="none", lowercase=True, moses_lang=tgt_lang)


def corpus_scores(hyps: list[str], refs: list[str], tgt_lang: str = "en", lowercase: bool = False,
                  options: BleuOptions | None = None) -> Score:
    """BLEU and chrF of detokenised hypotheses against one reference each.

    BLEU follows ``options`` (default: sacreBLEU's standard for ``tgt_lang``); chrF is always
    sacreBLEU's default chrF on the detokenised text.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    opts = options or default_options(tgt_lang, lowercase)
    # force: Moses-tokenised input is meant to look tokenised (no "forgot to detokenize" warning)
    bleu = BLEU(tokenize=opts.tokenize, lowercase=opts.lowercase, force=opts.moses_lang is not None)
    chrf = CHRF()
    b = bleu.corpus_score(opts.preprocess(hyps), [opts.preprocess(refs)])
    c = chrf.corpus_score(hyps, [refs])
    return Score(
        bleu=round(b.score, 2),
        chrf=round(c.score, 2),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        n=len(hyps),
    )
