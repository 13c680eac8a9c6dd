"""Translate raw text with a trained model, without Hydra or a prepared corpus.

A :class:`Translator` holds what decoding needs: the model, the joint SentencePiece vocabulary,
the pretrained encoder's tokenizer (fused models) and the run's typed config (decoding settings
in ``cfg.eval``). Decoding goes through :func:`bertnmt.decoding.loop.decode_corpus`, the loop that training
uses too. ``bertnmt.load_model(path)``
builds one from an exported folder or a checkpoint. Sentences go through the same steps as the
prepared corpus (NFC + strip, SentencePiece, the encoder's tokenizer), so a split decoded here
gives the hypotheses that the training pipeline reports.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from bertnmt.core.config import Config
from bertnmt.data.corpora import normalise
from bertnmt.data.prepare import Split
from bertnmt.data.tokenize import EncoderTokenizer, SubwordVocab
from bertnmt.decoding.loop import DecodeOptions, decode_corpus, decode_split, options_from_eval
from bertnmt.core.devices import pick_device
from bertnmt.core.errors import ConfigError
from bertnmt.model.nmt import BertFusedTransformer

log = logging.getLogger(__name__)


@dataclass
class Hypothesis:
    text: str  # detokenised translation
    score: float | None  # beam score: sum of log-probs / (length incl. eos) ** lenpen; None for greedy
    tokens: list[int]  # SentencePiece ids, without bos/eos


class Translator:
    """Model + vocabulary + encoder tokenizer + config: ``translate(["a sentence"], beam=5)``."""

    def __init__(self, cfg: Config, model: BertFusedTransformer, vocab: SubwordVocab,
                 tokenizer: EncoderTokenizer | None, device: str | torch.device = "auto", source: str = ""):
        if model.bert is not None and tokenizer is None:
            raise ValueError("a BERT-fused model needs the encoder's tokenizer")
        self.cfg, self.vocab, self.tokenizer, self.source = cfg, vocab, tokenizer, source
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()

    def __repr__(self) -> str:
        enc = self.cfg.bert.path if self.model.bert is not None else "none"
        return f"Translator({self.source or 'in memory'}, model={self.cfg.model.name}, encoder={enc}, device={self.device})"

    @property
    def enc_pad_id(self) -> int | None:
        return self.tokenizer.pad_id if self.model.bert is not None and self.tokenizer is not None else None

    def encode(self, sentences: list[str]) -> Split:
        """A split of raw sentences (no references), tokenised as ``prepare_data`` does."""
        texts = [normalise(s) for s in sentences]
        src_ids = [np.asarray(ids, dtype=np.int32) for ids in self.vocab.encode_batch(texts)] if texts else []
        enc_ids = None
        if self.enc_pad_id is not None:
            ids, n_cut = self.tokenizer.encode_batch(texts)
            if n_cut:
                log.warning("%d sentences were truncated to the encoder's max_length=%d", n_cut, self.tokenizer.max_length)
            enc_ids = [np.asarray(seq, dtype=np.int32) for seq in ids]
        empty = [np.zeros(0, dtype=np.int32)] * len(texts)
        return Split("input", texts, [""] * len(texts), src_ids, empty, enc_ids)

    def options(self, beam: int | None = None, lenpen: float | None = None, nbest: int = 1) -> DecodeOptions:
        """The run's ``eval`` decoding settings, with ``beam`` / ``lenpen`` / ``nbest`` overridden where given."""
        beam = self.check_beam(beam, nbest)
        lenpen = self.cfg.eval.lenpen if lenpen is None else lenpen
        return options_from_eval(self.cfg.eval, beam=beam, lenpen=lenpen, nbest=nbest,
                                 precision=self.cfg.trainer.precision)

    def check_beam(self, beam: int | None, nbest: int = 1) -> int:
        """The beam size to use (the run's eval.beam when None); ConfigError for a bad beam or nbest."""
        beam = self.cfg.eval.beam if beam is None else beam
        if beam < 1:
            raise ConfigError(f"beam={beam} must be at least 1")
        if not 1 <= nbest <= beam:
            raise ConfigError(f"nbest={nbest} must be between 1 and the beam size ({beam})")
        return beam

    def translate_split(self, split: Split, beam: int | None = None, lenpen: float | None = None) -> list[str]:
        """The best translation of every sentence of an encoded split (greedy when beam == 1)."""
        opts = self.options(beam, lenpen)
        if len(split) == 0:
            return []
        return decode_split(self.model, split, self.vocab, opts, self.device, self.enc_pad_id)

    def translate(self, sentences: list[str], beam: int | None = None, nbest: int = 1,
                  lenpen: float | None = None) -> list[str] | list[list[str]]:
        """Translations in input order: one string per sentence, or (``nbest`` > 1) a list of the
        ``nbest`` best, best first. ``beam``/``lenpen`` default to the run's ``eval`` settings."""
        if nbest > 1:
            return [[h.text for h in hyps] for hyps in self.translate_nbest(sentences, beam, nbest, lenpen)]
        split = self.encode(sentences)
        keep = [i for i, t in enumerate(split.src_text) if t]  # an empty line translates to an empty line
        out = [""] * len(sentences)
        for i, hyp in zip(keep, self.translate_split(_subset(split, keep), beam, lenpen)):
            out[i] = hyp
        return out

    def translate_nbest(self, sentences: list[str], beam: int | None = None, nbest: int = 1,
                        lenpen: float | None = None) -> list[list[Hypothesis]]:
        """The ``nbest`` best hypotheses of every sentence, with their beam scores, best first."""
        opts = self.options(beam, lenpen, nbest)
        split = self.encode(sentences)
        keep = [i for i, t in enumerate(split.src_text) if t]
        out: list[list[Hypothesis]] = [[Hypothesis("", None, [])] for _ in sentences]
        if not keep:
            return out
        sub = _subset(split, keep)
        found = decode_corpus(self.model, sub.src_ids, sub.enc_ids, opts, self.device, self.enc_pad_id)
        for i, hyps in zip(keep, found):
            out[i] = [Hypothesis(self.vocab.decode(ids), score, list(ids)) for ids, score in hyps]
        return out


def _subset(split: Split, keep: list[int]) -> Split:
    if len(keep) == len(split):
        return split
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    enc = pick(split.enc_ids) if split.enc_ids is not None else None
    return Split(split.name, pick(split.src_text), pick(split.tgt_text), pick(split.src_ids), pick(split.tgt_ids), enc)


def format_hypotheses(index: int, source: str, hyps: list[Hypothesis], fmt: str) -> list[str]:
    """Output lines for one sentence: ``plain`` (the best translation), ``fairseq`` (``S-i`` source,
    then ``H-i<TAB>score<TAB>translation`` per hypothesis) or ``tsv`` (``i<TAB>rank<TAB>score<TAB>translation``)."""
    score = lambda h: "nan" if h.score is None else f"{h.score:.4f}"  # noqa: E731
    if fmt == "plain":
        return [hyps[0].text]
    if fmt == "fairseq":
        return [f"S-{index}\t{source}", *(f"H-{index}\t{score(h)}\t{h.text}" for h in hyps)]
    if fmt == "tsv":
        return [f"{index}\t{rank}\t{score(h)}\t{h.text}" for rank, h in enumerate(hyps, start=1)]
    raise ConfigError(f"output format {fmt!r} is not one of plain, fairseq, tsv")
