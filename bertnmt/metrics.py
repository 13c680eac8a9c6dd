"""Corpus-level BLEU and chrF through sacreBLEU, always with their signatures.

Hypotheses must be detokenised text (SentencePiece ``decode``) with no ``<unk>`` pieces:
sacreBLEU would split ``<unk>`` into ``< unk >`` and inflate the score (design pitfall 7).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF

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


def bleu_tokenizer_for(lang: str) -> str:
    """sacreBLEU's tokenizer for a target language (its own defaults; Korean needs ``sacrebleu[ko]``)."""
    if lang == "zh":
        return "zh"
    if lang in ("ja", "ko"):
        name = f"{lang}-mecab"
        try:
            BLEU(tokenize=name).corpus_score(["a"], [["a"]])
            return name
        except (RuntimeError, ImportError):
            log.warning("sacreBLEU's %s tokenizer is not installed (pip install sacrebleu[%s]); using 'char'", name, lang)
            return "char"
    return "13a"


def corpus_scores(hyps: list[str], refs: list[str], tgt_lang: str = "en", lowercase: bool = False) -> Score:
    """BLEU and chrF of detokenised hypotheses against one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    bleu = BLEU(tokenize=bleu_tokenizer_for(tgt_lang), lowercase=lowercase)
    chrf = CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return Score(
        bleu=round(b.score, 2),
        chrf=round(c.score, 2),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        n=len(hyps),
    )
