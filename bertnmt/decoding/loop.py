"""The one batched decode loop: validation BLEU, the test decode, the Translator and the bench use it.

``decode_corpus`` sorts the sentences by length, cuts them into batches by a token budget (beam x
sentences x the longest source, NMT or encoder tokens), decodes each batch with
:func:`bertnmt.decoding.search.search` and returns the hypotheses in input order. Sorting keeps padding low
and lets a batch's sentences finish at about the same step. It needs the model, token ids and
:class:`DecodeOptions`, nothing from training.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch

from bertnmt.core.config import EvalConfig
from bertnmt.data.collate import collate
from bertnmt.data.features import FeatureStore
from bertnmt.data.prepare import Split
from bertnmt.data.tokenize import SubwordVocab
from bertnmt.core.devices import autocast
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.decoding.search import DecodeOptions, Hyps, search

__all__ = ["DecodeOptions", "decode_corpus", "decode_split", "head", "length_batches", "options_from_eval"]

# Token budget per batch when DecodeOptions.max_tokens is 0. On a GPU, batches of thousands of sentences
# keep the device busy. On the CPU, batches of about 80 sentences at beam 5 are near the old loop's.
DEFAULT_MAX_TOKENS = {"cuda": 131072, "cpu": 8192}


def options_from_eval(ev: EvalConfig, **overrides: Any) -> DecodeOptions:
    """The decoding options of a run's ``eval`` config (``beam``, ``lenpen``, ... overridable)."""
    opts = DecodeOptions(beam=ev.beam, lenpen=ev.lenpen, max_len_a=ev.max_len_a, max_len_b=ev.max_len_b,
                         min_len=ev.min_len, max_tokens=ev.max_tokens, max_sents=ev.batch_sents,
                         check_every=ev.check_every, pad_id=SubwordVocab.pad_id, unk_id=SubwordVocab.unk_id,
                         bos_id=SubwordVocab.bos_id, eos_id=SubwordVocab.eos_id)
    return replace(opts, **overrides) if overrides else opts


def head(split: Split, n: int) -> Split:
    """The first ``n`` sentences of a split."""
    if n <= 0 or n >= len(split.src_ids):
        return split
    enc = split.enc_ids[:n] if split.enc_ids is not None else None
    return replace(split, src_text=split.src_text[:n], tgt_text=split.tgt_text[:n],
                   src_ids=split.src_ids[:n], tgt_ids=split.tgt_ids[:n], enc_ids=enc)


def length_batches(src_lens: Sequence[int], enc_lens: Sequence[int] | None, beam: int, max_tokens: int,
                   max_sents: int = 0) -> list[list[int]]:
    """Sentence indices cut into batches, longest first: ``beam x batch size x its longest source`` (source
    tokens + eos, or encoder tokens where longer) stays within ``max_tokens``; a longer sentence goes alone."""
    cost = [n + 1 for n in src_lens] if enc_lens is None else [max(n + 1, e) for n, e in zip(src_lens, enc_lens)]
    order = sorted(range(len(cost)), key=lambda i: (-cost[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, cost[i])
        if cur and (beam * (len(cur) + 1) * w > max_tokens or (max_sents and len(cur) >= max_sents)):
            batches.append(cur)
            cur, w = [], cost[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def decode_corpus(model: BertFusedTransformer, src_ids: Sequence[np.ndarray], enc_ids: Sequence[np.ndarray] | None,
                  opts: DecodeOptions, device: torch.device, enc_pad_id: int | None = None,
                  features: FeatureStore | None = None) -> list[Hyps]:
    """Decode every sentence; per sentence, in input order, its hypotheses (token ids without bos/eos, score).

    ``src_ids``: SentencePiece ids without eos. ``enc_ids``: the pretrained encoder's ids (fused models,
    with ``enc_pad_id``). ``features``: cached H_B of the same sentences (valid only while the encoder has
    never trained)."""
    use_enc = model.bert is not None
    if use_enc and (enc_ids is None or enc_pad_id is None):
        raise ValueError("a BERT-fused model needs enc_ids and enc_pad_id")
    enc = enc_ids if use_enc else None
    budget = opts.max_tokens or DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cpu"])
    batches = length_batches([len(s) for s in src_ids], [len(e) for e in enc] if enc is not None else None,
                             opts.beam, budget, opts.max_sents)
    out: list[Hyps] = [[] for _ in src_ids]
    empty = np.zeros(0, dtype=np.int32)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast(device, opts.precision):
        for idx in batches:
            samples = [(i, src_ids[i], empty, enc[i] if enc is not None else None,
                        features.get(i) if features is not None and enc is not None else None) for i in idx]
            b = collate(samples, enc_pad_id if enc is not None else None, opts.pad_id, opts.bos_id, opts.eos_id)
            b = b.to(device)
            bert_out = (b.bert_feats.float(), b.enc_mask.eq(0)) if b.bert_feats is not None else None  # (B, E, Hb)
            for i, hyps in zip(idx, search(model, b.src, b.enc_ids, b.enc_mask, opts, bert_out)):
                out[i] = hyps
    model.train(was_training)
    return out


def decode_split(model: BertFusedTransformer, split: Split, vocab: SubwordVocab, opts: DecodeOptions,
                 device: torch.device, enc_pad_id: int | None = None, features: FeatureStore | None = None,
                 limit: int = 0) -> list[str]:
    """The detokenised best hypothesis of every sentence of a split (its first ``limit``; 0 = all), in order."""
    sub = head(split, limit)
    found = decode_corpus(model, sub.src_ids, sub.enc_ids, opts, device, enc_pad_id, features)
    return [vocab.decode(hyps[0][0]) for hyps in found]
