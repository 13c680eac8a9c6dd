"""Decode a split of the run's data, or any source file, and score it with sacreBLEU.

``evaluate(model, ...)`` takes an exported folder, a checkpoint (also an averaged one) or a run
directory, decodes with beam search, writes the hypotheses to ``<out>.hyp`` and the scores with
their sacreBLEU signatures and the BLEU options in words to ``<out>.json``. ``paper_style=True``
computes BLEU as the paper's IWSLT'14 numbers were (case-insensitive, on Moses-tokenised text;
see :func:`bertnmt.decoding.metrics.paper_options`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bertnmt.core.atomic import write_json, write_text
from bertnmt.core.atomic import check_writable
from bertnmt.data.corpora import SPLITS, normalise, read_lines
from bertnmt.core.errors import ConfigError, DataError
from bertnmt.inference.loading import load_model
from bertnmt.decoding.metrics import BleuOptions, bleu_tokenizer_for, corpus_scores, paper_options
from bertnmt.inference.translator import Translator

log = logging.getLogger(__name__)


def bleu_options(tgt_lang: str, paper_style: bool = False, lowercase: bool = False,
                 tokenize: str | None = None) -> BleuOptions:
    """Paper style, or sacreBLEU's standard for ``tgt_lang`` with an optional tokenizer / case override."""
    if paper_style:
        if tokenize is not None:
            raise ConfigError("--paper-style fixes the tokenisation; drop --tokenize")
        return paper_options(tgt_lang)
    return BleuOptions(tokenize=tokenize or bleu_tokenizer_for(tgt_lang), lowercase=lowercase)


def check_tokenize(tokenize: str | None) -> None:
    """A ConfigError unless ``tokenize`` is one of sacreBLEU's tokenizers (checked before decoding)."""
    from sacrebleu.metrics import BLEU

    if tokenize is None:
        return
    if tokenize not in BLEU.TOKENIZERS:
        raise ConfigError(f"--tokenize {tokenize!r} is not a sacreBLEU tokenizer; "
                          f"choose one of {', '.join(BLEU.TOKENIZERS)}")
    try:
        BLEU(tokenize=tokenize)
    except (RuntimeError, ImportError, OSError) as e:  # mecab without its package, spm without its download
        raise ConfigError(f"--tokenize {tokenize!r} is not usable here: {' '.join(str(e).split())}") from None


def _split_texts(tr: Translator, split: str, cache_dir: str | None) -> tuple[list[str], list[str]]:
    """Sources and references of a split of the model's configured corpus (prepared and cached as in training)."""
    from bertnmt.data.prepare import prepare_data

    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    dcfg = tr.cfg.data if cache_dir is None else replace(tr.cfg.data, cache_dir=cache_dir)
    data = prepare_data(dcfg)
    if data.vocab.sha256 != tr.vocab.sha256:
        log.warning("the prepared data's vocabulary differs from the model's; sentences are re-encoded with the model's")
    s = data.splits[split]
    return s.src_text, s.tgt_text


def _file_texts(src: str | Path, ref: str | Path | None) -> tuple[list[str], list[str] | None]:
    sources = read_lines(Path(src))
    if not sources:
        raise DataError(f"{src}: empty file, nothing to translate")
    if ref is None:
        return sources, None
    refs = [normalise(r) for r in read_lines(Path(ref))]
    if len(refs) != len(sources):
        raise DataError(f"line counts differ: {src} has {len(sources)} lines, {ref} has {len(refs)}")
    return sources, refs


def default_out(model: str | Path, name: str, beam: int, paper_style: bool) -> Path:
    """``<folder of the model>/eval.<name>.beam<k>[.paper]`` (the folder itself for an export or run dir)."""
    model = Path(model)
    folder = model if model.is_dir() else model.parent
    stem = model.stem if model.is_file() else "model"
    return folder / f"eval.{stem}.{name}.beam{beam}{'.paper' if paper_style else ''}"


def evaluate(model: str | Path, *, split: str = "test", src: str | Path | None = None, ref: str | Path | None = None,
             beam: int | None = None, lenpen: float | None = None, paper_style: bool = False, lowercase: bool = False,
             tokenize: str | None = None, tgt_lang: str | None = None, out: str | Path | None = None,
             device: str = "auto", bert_path: str | None = None, vocab: str | Path | None = None, limit: int = 0,
             cache_dir: str | None = None, config: str | Path | None = None,
             translator: Translator | None = None) -> dict[str, Any]:
    """Decode and score; returns the record written to ``<out>.json`` (scores only when references exist).

    The options, the input files and the output folder are checked before the model is loaded, so a
    mistake costs no decoding: a negative ``limit``, an unknown ``tokenize``, an empty ``src``, line
    counts that differ, an ``out`` whose folder cannot be made.
    """
    if limit < 0:
        raise ConfigError(f"--limit {limit}: must be 0 (every sentence) or a positive number of sentences")
    check_tokenize(tokenize)
    if paper_style and tokenize is not None:
        raise ConfigError("--paper-style fixes the tokenisation; drop --tokenize")
    if ref is not None and src is None:
        raise ConfigError("--ref needs --src (a split brings its own references)")
    if src is None and split not in SPLITS:
        raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    files = _file_texts(src, ref) if src is not None else None
    if out is not None:
        check_writable(Path(out).parent, "--out")
    tr = translator or load_model(model, device=device, bert_path=bert_path, vocab=vocab, config=config)
    beam = tr.check_beam(beam)
    lenpen = tr.cfg.eval.lenpen if lenpen is None else lenpen
    if files is not None:
        sources, refs = files
        name = Path(src).name
    else:
        sources, refs = _split_texts(tr, split, cache_dir)
        name = split
    if limit:
        sources, refs = sources[:limit], (refs[:limit] if refs is not None else None)
    out = Path(out) if out is not None else default_out(model, name, beam, paper_style)
    check_writable(out.parent, "--out")
    start = time.perf_counter()
    hyps = tr.translate(sources, beam=beam, lenpen=lenpen)
    elapsed = time.perf_counter() - start

    hyp_path = out.with_name(out.name + ".hyp")
    write_text(hyp_path, "".join(h + "\n" for h in hyps))
    record: dict[str, Any] = {
        "model": str(model), "source": str(src) if src is not None else f"{tr.cfg.data.corpus}:{split}",
        "reference": str(ref) if ref is not None else (None if src is not None else f"{tr.cfg.data.corpus}:{split}"),
        "n": len(hyps), "beam": beam, "lenpen": lenpen, "decode_time_s": round(elapsed, 2),
        "sentences_per_s": round(len(hyps) / max(elapsed, 1e-9), 1), "hypotheses": hyp_path.name,
    }
    if refs is not None:
        lang = tgt_lang or tr.cfg.data.tgt_lang
        opts = bleu_options(lang, paper_style, lowercase, tokenize)
        score = corpus_scores(hyps, refs, lang, options=opts)
        record.update(score.to_dict(), tgt_lang=lang, paper_style=paper_style, bleu_options=opts.describe())
    json_path = out.with_name(out.name + ".json")
    write_json(json_path, record)
    record["scores_file"] = str(json_path)
    record["hypotheses_file"] = str(hyp_path)
    return record


def format_record(rec: dict[str, Any]) -> str:
    """The lines ``scripts/evaluate.py`` prints."""
    lines = [f"{rec['source']}: {rec['n']} sentences, beam {rec['beam']}, lenpen {rec['lenpen']}, "
             f"{rec['decode_time_s']:.1f} s ({rec['sentences_per_s']:.1f} sentences/s)"]
    if "bleu" in rec:
        lines += [f"BLEU {rec['bleu']:.2f}  chrF {rec['chrf']:.2f}",
                  f"BLEU options: {rec['bleu_options']}",
                  f"BLEU signature: {rec['bleu_signature']}",
                  f"chrF signature: {rec['chrf_signature']}"]
    else:
        lines.append("no references: nothing scored")
    lines.append(f"hypotheses: {rec['hypotheses_file']}; scores: {rec['scores_file']}")
    return "\n".join(lines)
