"""Is a system's test score different from a baseline's? sacreBLEU's paired bootstrap resampling.

Both systems are scored on the same resampled test sets (``n_samples`` draws of the test sentences
with replacement, sacreBLEU's fixed seed); the p-value is that of the observed difference under the
resampled differences (Koehn 2004, as in Moses' ``bootstrap-hypothesis-difference-significance.pl``);
sacreBLEU counts only strictly larger differences and adds one, so its smallest p-value is 1/(n+1),
which it also gives two identical systems (a zero difference is not attributed to chance).
The 95% intervals are each system's bootstrap interval (mean ± half-width). BLEU is computed with
the same options as :func:`bertnmt.decoding.metrics.corpus_scores`, chrF with sacreBLEU's default.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from bertnmt.decoding.metrics import default_options

N_SAMPLES = 1000


def paired_bootstrap(refs: list[str], baseline: list[str], system: list[str], tgt_lang: str,
                     n_samples: int = N_SAMPLES) -> dict[str, Any]:
    """``{"bleu": {...}, "chrf": {...}, "n_samples": n, "signature": ...}``; per metric: ``baseline``,
    ``system``, ``delta`` (system minus baseline), ``p_value`` and the 95% intervals
    ``baseline_ci``/``system_ci`` as ``[low, high]`` around each bootstrap mean."""
    if not (len(refs) == len(baseline) == len(system)):
        raise ValueError(f"{len(refs)} references, {len(baseline)} baseline and {len(system)} system hypotheses")
    opts = default_options(tgt_lang)
    bleu = BLEU(tokenize=opts.tokenize, lowercase=opts.lowercase, force=opts.moses_lang is not None)
    out: dict[str, Any] = {"n_samples": n_samples, "n_sentences": len(refs)}
    for key, metric, prep in (("bleu", bleu, opts.preprocess), ("chrf", CHRF(), lambda x: x)):
        quiet = logging.getLogger("sacrebleu")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # sacreBLEU logs every step of the test at INFO
        try:
            test = PairedTest([("baseline", prep(baseline)), ("system", prep(system))], {key: metric},
                              references=[prep(refs)], test_type="bs", n_samples=n_samples)
            sigs, scores = test()
        finally:
            quiet.setLevel(level)
        name = next(k for k in scores if k != "System")
        base, sys_ = scores[name]
        out[key] = {
            "baseline": round(base.score, 2), "system": round(sys_.score, 2), "delta": round(sys_.score - base.score, 2),
            "p_value": round(float(sys_.p_value), 4),
            "baseline_ci": _interval(base), "system_ci": _interval(sys_),
            "signature": str(sigs[name]),
        }
    return out


def _interval(r: Any) -> list[float]:
    return [round(float(r.mean - r.ci), 2), round(float(r.mean + r.ci), 2)]


def read_lines(path: str | Path) -> list[str]:
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def compare_files(ref: str | Path, baseline: str | Path, system: str | Path, tgt_lang: str,
                  n_samples: int = N_SAMPLES) -> dict[str, Any]:
    """:func:`paired_bootstrap` of two hypothesis files (one sentence a line) against a reference file."""
    return paired_bootstrap(read_lines(ref), read_lines(baseline), read_lines(system), tgt_lang, n_samples)
