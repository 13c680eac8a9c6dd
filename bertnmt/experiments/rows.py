"""The rows of the paper's ablation table (paper sections 3 and 6) and how a sweep names its runs.

Each row is an experiment config, ``conf/exp/ablation/<name>.yaml``; a run of a row with a seed lives in
``<out>/<row>/seed<k>/`` and is finished when it holds a ``summary.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from bertnmt.core.errors import ConfigError

PAPER_TRANSFORMER = 28.57  # the paper's Transformer on IWSLT'14 En->De: the reference of its deltas


@dataclass(frozen=True)
class Row:
    """One row of the table: ``conf/exp/ablation/<name>.yaml``.

    init: how the row's NMT part starts: "baseline" (warm start from the shared cached baseline),
    "continued" (the plain model continues that baseline) or "scratch" (trained from scratch for the
    baseline's and the fused stage's epochs together).
    """

    name: str
    label: str
    paper_bleu: Optional[float]  # IWSLT'14 En->De BLEU from the paper, None if not given
    init: str

    @property
    def exp(self) -> str:
        return f"ablation/{self.name}"

    @property
    def paper_delta(self) -> Optional[float]:
        return None if self.paper_bleu is None else round(self.paper_bleu - PAPER_TRANSFORMER, 2)


def _rows() -> tuple[Row, ...]:
    rows = [
        Row("transformer", "Transformer (no pretrained encoder)", 28.57, "continued"),
        Row("fused", "BERT-fused: frozen, drop-net 1.0, warm start", 30.45, "baseline"),
        Row("no_warm_start", "no warm start (NMT part from scratch)", 27.03, "scratch"),
        Row("finetune", "pretrained encoder tuned jointly", 28.87, "baseline"),
        Row("bert_init_encoder", "pretrained encoder replaces the NMT encoder, fine-tuned", 27.14, "scratch"),
        Row("feature_based", "encoder output as the NMT encoder's input embeddings", 29.67, "scratch"),
        Row("no_enc_bert_attn", "no BERT-encoder attention (decoder fusion only)", 29.87, "baseline"),
        Row("no_dec_bert_attn", "no BERT-decoder attention (encoder fusion only)", 29.90, "baseline"),
        Row("stacked", "stacked instead of averaged attentions", 29.35, "baseline"),
        Row("transformer_12l", "Transformer, 12-layer encoder", 29.27, "scratch"),
        Row("transformer_18l", "Transformer, 18-layer encoder", 28.92, "scratch"),
    ]
    rows += [Row(f"dropnet_0{k}", f"drop-net p_net = 0.{k}", None, "baseline") for k in (0, 2, 4, 6, 8)]
    rows += [Row(f"layer_{k}", f"encoder layer {k} feeds the fusion", None, "baseline") for k in range(1, 6)]
    rows += [
        Row("layer_mix", "learned softmax mix of all encoder layers", None, "baseline"),
        Row("fuse_first_3", "BERT attention in the first 3 layers only", None, "baseline"),
        Row("fuse_last_3", "BERT attention in the last 3 layers only", None, "baseline"),
        Row("random_features", "control: random vectors instead of H_B", None, "baseline"),
        Row("random_encoder", "control: randomly initialised encoder, frozen", None, "baseline"),
    ]
    return tuple(rows)


ROWS: tuple[Row, ...] = _rows()
ROW_BY_NAME: dict[str, Row] = {r.name: r for r in ROWS}


def select_rows(names: str | Sequence[str] | None = None) -> list[Row]:
    """Rows by name (``"a,b"`` or a list), in table order; None or "all" = every row."""
    if names is None or names == "all":
        return list(ROWS)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in ROW_BY_NAME]
    if unknown:
        raise ConfigError(f"--rows: unknown row(s) {', '.join(unknown)} (known: {', '.join(ROW_BY_NAME)})")
    if not wanted:
        raise ConfigError("--rows is empty")
    return [r for r in ROWS if r.name in wanted]


Job = tuple[Row, int]  # one run: a row with a seed


def plan_jobs(rows: str | Sequence[str] | None, seeds: Sequence[int]) -> list[Job]:
    """The runs of one call, in the order they run.

    ``rows`` items are row names or ``name@seed``. With any ``@seed`` the runs follow the order given (a
    plain name runs with each of ``seeds``), so the most important runs can come first; without, every
    seed in turn runs all chosen rows in table order."""
    items = [n.strip() for n in (rows.split(",") if isinstance(rows, str) else rows or []) if n.strip()]
    if not any("@" in n for n in items):
        selected = select_rows(rows)
        return [(r, s) for s in seeds for r in selected]
    jobs: list[Job] = []
    for item in items:
        name, _, seed = item.partition("@")
        row = select_rows([name])[0]
        try:
            job_seeds = [int(seed)] if seed else list(seeds)
        except ValueError:
            raise ConfigError(f"--rows: {item!r} is not NAME or NAME@SEED (an integer seed)") from None
        for k in job_seeds:
            if (row, k) in jobs:
                raise ConfigError(f"--rows: {row.name} with seed {k} is listed twice")
            jobs.append((row, k))
    return jobs


def parse_seeds(text: str | None) -> Optional[list[int]]:
    """``"1,2,3"`` -> [1, 2, 3]; None -> None (the config's ``trainer.seed``)."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds={text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds={text!r}: give distinct integers, e.g. 1,2,3")
    return seeds


def row_dir(out: Path, row: str, seed: int) -> Path:
    return Path(out) / row / f"seed{seed}"


def is_finished(path: Path) -> bool:
    return (Path(path) / "summary.json").is_file()
