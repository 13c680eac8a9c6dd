"""The ablation report: every finished row of ``<out>/<row>/seed<k>/`` collected into ``ablations.md``
(our test BLEU and its delta against our Transformer row, the paper's BLEU and delta, epoch time,
trainable/total parameters) and ``ablations.png`` (the deltas, ours against the paper's).

Reads only what the runs wrote (``summary.json``, ``config.yaml``, ``meta.json``), so
``scripts/ablate.py --report-only`` rebuilds it from existing folders.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertnmt.core.atomic import atomic_path, write_text
from bertnmt.experiments.rows import ROWS, Row, is_finished

REFERENCE = "transformer"  # our deltas are against this row


@dataclass
class RowResult:
    """One row over its finished seeds."""

    row: Row
    seeds: list[int] = field(default_factory=list)
    bleu: list[float] = field(default_factory=list)  # test BLEU per seed (final stage, beam search)
    chrf: list[float] = field(default_factory=list)
    epoch_time_s: list[float] = field(default_factory=list)  # mean epoch time of the final stage, per seed
    epochs: str = ""  # "3+1": baseline + own stage epochs; "4": from scratch
    start: str = ""  # "warm start", "continued", "scratch"
    trainable_params: int | None = None
    total_params: int | None = None
    baseline_bleu: float | None = None  # the shared warm-start baseline's test BLEU, when it had one
    run_dirs: list[str] = field(default_factory=list)
    own_epochs: list[int] = field(default_factory=list)  # epochs the row's own stage trained, per seed
    best_epochs: list[int | None] = field(default_factory=list)  # its best validation epoch, per seed
    stops: list[str] = field(default_factory=list)  # why it ended: early_stop | max_epochs | max_steps, per seed
    hyps: list[str | None] = field(default_factory=list)  # its test hypothesis file, per seed

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.bleu) if self.bleu else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.bleu) if len(self.bleu) > 1 else None


def _seed_of(path: Path) -> int:
    return int(path.name[len("seed"):])


def read_row(out: Path, row: Row) -> RowResult | None:
    """The finished seeds of one row, or None when none has finished."""
    folder = Path(out) / row.name
    seeds = sorted((p for p in folder.glob("seed*") if p.name[4:].lstrip("-").isdigit() and is_finished(p)),
                   key=_seed_of)
    if not seeds:
        return None
    res = RowResult(row)
    for path in seeds:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        stage = summary.get("final_stage") or ("fused" if "fused" in summary else "baseline")
        s = summary[stage]
        res.seeds.append(_seed_of(path))
        res.run_dirs.append(str(path))
        if s.get("test_bleu") is not None:
            res.bleu.append(float(s["test_bleu"]))
            res.chrf.append(float(s.get("test_chrf", float("nan"))))
        res.epoch_time_s.append(float(s.get("mean_epoch_time_s", float("nan"))))
        res.own_epochs.append(int(s.get("epochs", 0)))
        res.best_epochs.append(s.get("best_epoch"))
        res.stops.append(str(s.get("stop", "?")))
        hyp = path / f"test.{stage}.hyp"
        res.hyps.append(str(hyp) if hyp.is_file() else None)
        res.trainable_params, res.total_params = s.get("trainable_params"), s.get("total_params")
        base = summary.get("baseline") if stage != "baseline" else None
        if summary.get("warm_start"):
            res.start = "continued" if stage == "transformer" else "warm start"
            res.epochs = f"{base['epochs']}+{s['epochs']}" if base else f"ckpt+{s['epochs']}"
        else:
            res.start, res.epochs = "scratch", str(s["epochs"])
        if base and base.get("test_bleu") is not None:
            res.baseline_bleu = float(base["test_bleu"])
    return res


def collect(out: Path) -> list[RowResult]:
    """Every row with at least one finished seed, in table order."""
    return [r for r in (read_row(Path(out), row) for row in ROWS) if r is not None]


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _bleu_cell(r: RowResult) -> str:
    if r.mean is None:
        return "n/a"
    if r.sd is None:
        return f"{r.mean:.2f}"
    return f"{r.mean:.2f} ± {r.sd:.2f} (n={len(r.bleu)})"


def deltas(results: list[RowResult]) -> dict[str, float | None]:
    """Our BLEU change of every row against our Transformer row (None without it)."""
    ref = next((r.mean for r in results if r.row.name == REFERENCE), None)
    return {r.row.name: (None if ref is None or r.mean is None else r.mean - ref) for r in results}


def table_markdown(results: list[RowResult]) -> str:
    """The Markdown table of the report."""
    d = deltas(results)
    head = ("| row | config | start | epochs | test BLEU | Δ ours | paper BLEU | Δ paper | epoch time (s) "
            "| trainable / total params |")
    lines = [head, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        epoch = statistics.fmean(r.epoch_time_s) if r.epoch_time_s else None
        params = (f"{r.trainable_params:,} / {r.total_params:,}"
                  if r.trainable_params is not None and r.total_params is not None else "–")
        lines.append(
            f"| {r.row.label} | `{r.row.exp}` | {r.start} | {r.epochs} | {_bleu_cell(r)} | {_fmt(d[r.row.name], True)} "
            f"| {_fmt(r.row.paper_bleu)} | {_fmt(r.row.paper_delta, True)} | {_fmt(epoch).replace('–', 'n/a')} "
            f"| {params} |"
        )
    return "\n".join(lines)


def plot_deltas(results: list[RowResult], path: Path) -> Path | None:
    """A horizontal bar chart of the BLEU deltas against the Transformer row, ours beside the paper's.

    Uses matplotlib's Agg canvas directly (no display, no global backend switch). None when no row has a delta.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = deltas(results)
    rows = [r for r in results
            if r.row.name != REFERENCE and (d[r.row.name] is not None or r.row.paper_delta is not None)]
    if not rows:
        return None
    n = len(rows)
    fig = Figure(figsize=(8, 1.2 + 0.38 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(n))[::-1]
    h = 0.38
    ours = [d[r.row.name] if d[r.row.name] is not None else 0.0 for r in rows]
    err = [r.sd if r.sd is not None else 0.0 for r in rows]
    ax.barh([y + h / 2 for y in ys], ours, height=h, xerr=err if any(err) else None, color="#1f77b4", label="ours")
    paper = [(y - h / 2, r.row.paper_delta) for y, r in zip(ys, rows, strict=True) if r.row.paper_delta is not None]
    if paper:
        ax.barh([p[0] for p in paper], [p[1] for p in paper], height=h, color="#ff7f0e", label="paper (IWSLT'14 En-De)")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r.row.name for r in rows])
    ax.set_xlabel("test BLEU minus the Transformer row")
    ax.set_title("Ablations: BLEU change against the Transformer")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def _setup(results: list[RowResult]) -> list[str]:
    """What the rows ran with, from one row's resolved config and meta (they share all but the row's keys)."""
    from omegaconf import OmegaConf

    if not results:
        return []
    run = Path(results[0].run_dirs[0])
    lines = []
    if (run / "config.yaml").is_file():
        c: Any = OmegaConf.load(run / "config.yaml")
        lines.append(f"- data: `{c.data.corpus}` {c.data.src_lang}→{c.data.tgt_lang}, model `{c.model.name}` "
                     f"(d {c.model.d_model}, {c.model.enc_layers}+{c.model.dec_layers} layers), "
                     f"encoder `{c.bert.path}`")
        lines.append(f"- budget: baseline {c.warm_start.max_epochs} epoch(s) (`warm_start.max_epochs`), own stage "
                     f"{c.trainer.max_epochs} epoch(s) (`trainer.max_epochs`"
                     + (f", at most {c.trainer.max_steps} updates" if c.trainer.max_steps else "")
                     + f"); from-scratch rows train both together; test decoding beam {c.eval.beam}")
    if (run / "meta.json").is_file():
        meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
        lines.append(f"- git `{meta.get('git_sha', '?')[:12]}`, data key `{meta.get('data_key', '?')}`, "
                     f"sacreBLEU `{meta.get('sacrebleu_signature', '?')}`")
    base = next((r.baseline_bleu for r in results if r.baseline_bleu is not None), None)
    if base is not None:
        lines.append(f"- the shared warm-start baseline alone: test BLEU {base:.2f}")
    return lines


def write_report(out: str | Path, command: str | None = None) -> Path:
    """Write ``<out>/ablations.md`` and ``<out>/ablations.png`` from the finished rows; returns the .md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = collect(out)
    missing = [r.name for r in ROWS if r.name not in {x.row.name for x in results}]
    png = plot_deltas(results, out / "ablations.png")
    parts = ["# Ablations", ""]
    if command:
        parts += [f"Command: `{command}`", ""]
    parts += _setup(results) + [""]
    parts += [table_markdown(results) if results else "No row has finished yet.", ""]
    parts += [
        "Δ ours: test BLEU minus our Transformer row (the plain model trained as long in all as the fused rows: "
        "it continues the shared baseline). Δ paper: the paper's IWSLT'14 En→De BLEU minus its Transformer "
        "(28.57). start: `warm start` from the shared cached baseline, `continued` (the Transformer row), "
        "`scratch` (trained for baseline + own epochs together). epochs: baseline + own stage. Parameters: "
        "the final stage's trainable / total, the pretrained encoder included in total. With several seeds: "
        "mean ± sample standard deviation.", "",
    ]
    if png is not None:
        parts += [f"![BLEU deltas]({png.name})", ""]
    if missing:
        parts += [f"Not run (or unfinished): {', '.join(missing)}.", ""]
    md = out / "ablations.md"
    write_text(md, "\n".join(parts))
    return md
