"""The converged sweep's table (``scripts/ablate.py --converge``; docs/reproduction.md).

One line per row of the sweep, in table order: test BLEU and chrF (mean ± sample sd over the finished
seeds), our BLEU change against the Transformer row beside the paper's, the epochs each seed trained
until early stopping and its best validation epoch, and sacreBLEU's paired bootstrap of every seed
against the Transformer row of the same seed (p-value; each system's 95% interval). Runs that have not
finished are shown as pending, so the table can be built at any time from what the folder holds.
A folder that keeps only the small result files (``docs/results/``: the corpus text stays out of git)
has no ``test.ref``; its references are then the test split of the run's own data config, prepared again.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bertnmt.core.errors import DataError
from bertnmt.decoding.significance import paired_bootstrap, read_lines
from bertnmt.experiments.ablation_report import REFERENCE, RowResult, read_row
from bertnmt.experiments.rows import ROW_BY_NAME, ROWS

START, END = "<!-- converged-table:start -->", "<!-- converged-table:end -->"
START_LABEL = {"baseline": "warm start", "continued": "continued", "scratch": "scratch"}


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "pending"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _tgt_lang(run_dir: str) -> str:
    from omegaconf import OmegaConf

    cfg = Path(run_dir) / "config.yaml"
    return str(OmegaConf.load(cfg).data.tgt_lang) if cfg.is_file() else "en"


@functools.lru_cache(maxsize=4)
def _prepared_references(data_yaml: str) -> tuple[str, tuple[str, ...]]:
    """(data key, test references) of a data config given as YAML, prepared (or loaded from the cache)."""
    from omegaconf import OmegaConf

    from bertnmt.core.config import DataConfig
    from bertnmt.data.prepare import prepare_data

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(data_yaml)))
    data = prepare_data(cfg)  # type: ignore[arg-type]
    return data.key, tuple(data.splits["test"].tgt_text)


def run_references(run_dir: str | Path) -> list[str]:
    """A run's test references: its ``test.ref``, or else the test split of the data in its ``config.yaml``,
    prepared again and checked against the data key its ``meta.json`` recorded."""
    from omegaconf import OmegaConf

    run = Path(run_dir)
    if (run / "test.ref").is_file():
        return read_lines(run / "test.ref")
    key, refs = _prepared_references(OmegaConf.to_yaml(OmegaConf.load(run / "config.yaml").data))
    meta = run / "meta.json"
    recorded = json.loads(meta.read_text(encoding="utf-8")).get("data_key") if meta.is_file() else None
    if recorded is not None and recorded != key:
        raise DataError(f"{run}: its test references cannot be rebuilt: the data prepared from its config.yaml "
                        f"has key {key}, the run used {recorded} (the corpus files or the data code changed)")
    return list(refs)


def significance(row: RowResult, ref: RowResult) -> dict[int, dict[str, Any]]:
    """Seed -> paired bootstrap (BLEU) of ``row`` against ``ref`` run with the same seed, where both decoded."""
    out: dict[int, dict[str, Any]] = {}
    for seed, hyp, run in zip(row.seeds, row.hyps, row.run_dirs, strict=True):
        if seed not in ref.seeds or hyp is None:
            continue
        k = ref.seeds.index(seed)
        if ref.hyps[k] is None:
            continue
        refs = run_references(run)
        if refs != run_references(ref.run_dirs[k]):
            continue  # not the same test set: no paired test
        out[seed] = paired_bootstrap(refs, read_lines(ref.hyps[k]), read_lines(hyp), _tgt_lang(run))["bleu"]
    return out


def _epochs_cell(r: RowResult) -> str:
    cells = []
    for n, best, stop in zip(r.own_epochs, r.best_epochs, r.stops, strict=True):
        cap = " cap" if stop == "max_epochs" else (" steps" if stop == "max_steps" else "")
        cells.append(f"{best if best is not None else '?'}/{n}{cap}")
    return ", ".join(cells) if cells else "pending"


def converged_table(out: str | Path, jobs: list[tuple[str, int]]) -> str:
    """The Markdown table of the sweep ``jobs`` ((row, seed) pairs) from the runs finished in ``out``."""
    planned: dict[str, list[int]] = {}
    for name, seed in jobs:
        planned.setdefault(name, []).append(seed)
    results = {name: read_row(Path(out), ROW_BY_NAME[name]) for name in planned}
    ref = results.get(REFERENCE)
    ref_mean = statistics.fmean(ref.bleu) if ref is not None and ref.bleu else None
    head = ("| row | start | seeds done | test BLEU | chrF | Δ BLEU ours | Δ BLEU paper | epochs: best/trained "
            "| p vs Transformer | 95% CI BLEU |")
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for row in (r for r in ROWS if r.name in planned):
        res = results[row.name]
        seeds = planned[row.name]
        done = [] if res is None else [s for s in res.seeds if s in seeds]
        paper = "–" if row.paper_delta is None else f"{row.paper_delta:+.2f}"
        start = START_LABEL.get(row.init, row.init)
        if res is None or not res.bleu:
            lines.append(f"| {row.label} | {start} | 0/{len(seeds)} | pending | pending | pending | {paper} "
                         f"| pending | pending | pending |")
            continue
        delta = "–" if ref_mean is None else f"{statistics.fmean(res.bleu) - ref_mean:+.2f}"
        sig = significance(res, ref) if ref is not None else {}  # the reference against itself: its interval
        p_cell = ("(reference)" if row.name == REFERENCE else
                  ", ".join(f"{sig[s]['p_value']:.3f} (s{s})" for s in sorted(sig)) or "pending")
        ci = []
        for s in res.seeds:
            if s in sig:
                lo, hi = sig[s]["system_ci"]
                ci.append(f"[{lo:.2f}, {hi:.2f}] (s{s})")
        lines.append(
            f"| {row.label} | {start} | {len(done)}/{len(seeds)} ({', '.join(f's{s}' for s in res.seeds)}) "
            f"| {_mean_sd(res.bleu)} | {_mean_sd(res.chrf)} | {delta} | {paper} | {_epochs_cell(res)} | {p_cell} "
            f"| {'; '.join(ci) or 'pending'} |")
    return "\n".join(lines)


LEGEND = (
    "test BLEU / chrF: beam search on the test split, sacreBLEU; mean ± sample sd over the finished seeds. "
    "Δ BLEU ours: the row's mean minus the Transformer row's mean. Δ BLEU paper: the paper's IWSLT'14 En→De "
    "BLEU minus its Transformer (28.57). start: `warm start` from the shared baseline of the same seed, "
    "`continued` = the plain Transformer continuing that baseline, `scratch` = trained from scratch. "
    "epochs: the epoch with the lowest validation loss (whose checkpoint is tested) / the epochs the row's own "
    "stage trained, per seed (`cap`: stopped by the epoch cap, not converged). p vs Transformer: sacreBLEU's "
    "paired bootstrap (1,000 resamples) of the row against the Transformer row of the same seed (sN); "
    "95% CI: the row's bootstrap interval of BLEU for that seed."
)


def write_converged(out: str | Path, jobs: list[tuple[str, int]], command: str | None = None) -> Path:
    """``<out>/converged.md``: the table, its legend and the runs still pending."""
    out = Path(out)
    parts = ["# Converged sweep", ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    parts += [converged_table(out, jobs), "", LEGEND, ""]
    pending = [f"{n}@{s}" for n, s in jobs if not (out / n / f"seed{s}" / "summary.json").is_file()]
    parts += [f"Pending: {', '.join(pending)}." if pending else "All runs finished.", ""]
    path = out / "converged.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def update_doc(doc: str | Path, table: str) -> None:
    """Replace the table between the ``converged-table`` markers of a Markdown file (atomically)."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8")
    if START not in text or END not in text:
        from bertnmt.core.errors import ConfigError

        raise ConfigError(f"{doc} has no {START} ... {END} markers to put the table between")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(f"{head}{START}\n{table}\n{END}{tail}", encoding="utf-8")
    os.replace(tmp, doc)
