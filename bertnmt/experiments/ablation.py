"""The paper's ablation table as one command: its rows, and running them (paper sections 3 and 6).

Every row is an experiment config, ``conf/exp/ablation/<row>.yaml``. :func:`run_ablation` runs the
chosen rows (all by default) through one Hydra multirun of ``scripts/train.py`` per seed (or in this
process, ``launcher="inprocess"``), each into ``<out>/<row>/seed<k>/``. All rows share the prepared
data cache and, for the rows that warm-start, one cached plain baseline (``pipeline.ensure_baseline``,
keyed by ``pipeline.baseline_key``, which leaves out every fusion-only setting; checked here before
anything runs). A row with a ``summary.json`` is finished and skipped on the next call (resumable);
an unfinished row folder is removed and the row runs again. The report (``ablations.md`` and
``ablations.png``) is built by :mod:`bertnmt.experiments.ablation_report`.

Budget (what a reader of the table expects, so that no row wins by training longer): with
``warm_start.max_epochs = B`` and ``trainer.max_epochs = F``,

* warm-started rows train the shared B-epoch baseline, then F epochs of their own model;
* the Transformer row continues the same baseline for F epochs (plain), B + F in all;
* the from-scratch rows (no warm start, the replaced and feature-based encoders, the 12/18-layer
  Transformers) train for B + F epochs (``warm_start.scratch_budget=total``).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from bertnmt.core.paths import CONF_DIR, PROJECT_ROOT, TRAIN_SCRIPT
from bertnmt.core.config import Config, register_configs, to_config
from bertnmt.core.errors import BertNMTError, ConfigError, TrainingError
from bertnmt.experiments.ablation_report import write_report
from bertnmt.experiments.convergence_report import write_converged
from bertnmt.experiments.rows import ROWS, Job, Row, is_finished, plan_jobs, row_dir  # noqa: F401 (ROWS: re-used by callers)

log = logging.getLogger(__name__)

LAUNCHERS = ("multirun", "inprocess")


def is_resumable(path: Path, cfg: Config) -> bool:
    """An unfinished row folder that the same config continues (``trainer.resume=auto``): it holds a
    ``config.yaml`` equal to ``cfg`` (output folder aside), so its checkpoints are this row's."""
    from omegaconf import OmegaConf

    from bertnmt.train.rundir import CONFIG, comparable, config_dict

    saved = Path(path) / CONFIG
    if not saved.is_file() or cfg.trainer.resume != "auto":
        return False
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except Exception:  # a torn or foreign file: not this row's run
        return False
    return comparable(old) == comparable(config_dict(cfg))  # type: ignore[arg-type]


def _split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(config overrides, ``hydra.*`` overrides); the keys the runner sets itself are refused."""
    cfg, hydra = [], []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in ("name", "exp", "trainer.seed", "output_dir") or key.startswith(("hydra.sweep", "hydra.run")):
            raise ConfigError(f"override {o!r}: the ablation runner sets {key} itself (seeds: --seeds)")
        (hydra if key.startswith("hydra") else cfg).append(o)
    return cfg, hydra


def compose_rows(rows: Sequence[Row], overrides: Sequence[str] = (), seeds: Sequence[Optional[int]] = (None,)
                 ) -> dict[tuple[str, Optional[int]], Config]:
    """The typed config of every (row, seed), as ``scripts/train.py +exp=ablation/<row> <overrides>
    trainer.seed=<seed>`` would build it (seed None: the config's own). A bad override is a ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    cfgs = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for row in rows:
            for seed in seeds:
                extra = [] if seed is None else [f"trainer.seed={seed}"]
                try:
                    cfg = to_config(compose(config_name="config", overrides=[f"+exp={row.exp}", *overrides, *extra]))
                except (HydraException, OmegaConfBaseException, ValueError) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ConfigError(f"row {row.name} ({CONF_DIR / 'exp' / row.exp}.yaml) with overrides "
                                      f"{list(overrides)}: {first}") from e
                if cfg.name != row.name:
                    raise ConfigError(f"{CONF_DIR / 'exp' / row.exp}.yaml: name must be {row.name!r} (it names the row's folder)")
                cfgs[row.name, seed] = cfg
    return cfgs


def compose_row(row: Row, overrides: Sequence[str] = (), seed: Optional[int] = None) -> Config:
    """The typed config of one row (see :func:`compose_rows`)."""
    return compose_rows([row], overrides, [seed])[row.name, seed]


def baseline_spec(cfg: Config) -> dict:
    """The config part of ``pipeline.baseline_key`` (the data part is the same for all rows of one call)."""
    from bertnmt.recipe.pipeline import FUSION_ONLY

    return {
        "model": {k: v for k, v in asdict(cfg.model).items() if k not in FUSION_ONLY},
        "optim": asdict(cfg.optim), "seed": cfg.trainer.seed, "accum": cfg.trainer.accum_steps,
        "warm_start": (cfg.warm_start.max_epochs, cfg.warm_start.max_steps), "data": asdict(cfg.data),
    }


def check_shared_baseline(cfgs: dict[str, Config]) -> None:
    """Every row that warm-starts from the automatic baseline must hit the same cached baseline."""
    specs = {name: baseline_spec(c) for name, c in cfgs.items() if c.warm_start.auto and c.warm_start.path is None}
    if len({repr(s) for s in specs.values()}) > 1:
        first = next(iter(specs))
        other = next(n for n, s in specs.items() if s != specs[first])
        raise ConfigError(f"rows {first} and {other} would train different warm-start baselines: "
                          "their configs differ outside the fusion settings")


def multirun_command(rows: Sequence[Row], seed: int, out: Path, overrides: Sequence[str]) -> list[str]:
    """The Hydra multirun that trains ``rows`` with ``seed`` into ``<out>/<row>/seed<seed>/``."""
    return [
        sys.executable, str(TRAIN_SCRIPT), "-m", "+exp=" + ",".join(r.exp for r in rows), f"trainer.seed={seed}",
        f"hydra.sweep.dir={Path(out).resolve()}", "hydra.sweep.subdir=${name}/seed${trainer.seed}", *overrides,
    ]


def _launch_multirun(rows: Sequence[Row], seed: int, out: Path, overrides: Sequence[str]) -> None:
    cmd = multirun_command(rows, seed, out, overrides)
    if not TRAIN_SCRIPT.is_file():
        raise ConfigError(f"{TRAIN_SCRIPT} is missing: run the ablations from a clone of bertnmt")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    log.info("launching: %s", " ".join(cmd))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise BertNMTError(f"the multirun for seed {seed} failed (exit {rc}); finished rows are kept: "
                           "fix the cause and rerun the same command to continue")


def _run_inprocess(row: Row, seed: int, out: Path, overrides: Sequence[str]) -> None:
    from bertnmt.recipe.pipeline import run

    cfg = compose_row(row, overrides, seed)
    cfg.output_dir = str(row_dir(out, row.name, seed))
    run(cfg)


CONVERGE = ("trainer=converge",)  # conf/trainer/converge.yaml: early stopping, patience 2, at most 25 epochs


def run_ablation(
    out: str | Path,
    rows: str | Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    seeds: Optional[Sequence[int]] = None,
    launcher: str = "multirun",
    converge: bool = False,
) -> Path:
    """Run the runs that have not finished, then write the report; returns the path of ``ablations.md``.

    rows: names (table order, every seed) or ``name@seed`` items (run in the order given; see :func:`plan_jobs`).
    overrides: passed to every row (``data=... trainer.max_epochs=1``); ``hydra.*`` ones to the multirun only.
    seeds: one run per row and seed (``trainer.seed``); None = the config's seed.
    converge: train every row until its validation loss stops improving (``trainer=converge``, before ``overrides``).
    Resumable: a finished run (``summary.json``) is skipped; an unfinished one of the same config continues
    from its last checkpoint; an unfinished one of another config is removed and runs again.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
    out = Path(out)
    all_over = [*(CONVERGE if converge else ()), *overrides]
    cfg_over, hydra_over = _split_overrides(all_over)
    seeds_given = seeds is not None
    if seeds is None:
        first = plan_jobs(rows, [0])[0][0]
        seeds = [compose_row(first, cfg_over).trainer.seed]
    jobs = plan_jobs(rows, seeds)
    selected = list(dict.fromkeys(r for r, _ in jobs))
    job_seeds = list(dict.fromkeys(s for _, s in jobs))
    cfgs = compose_rows(selected, cfg_over, job_seeds)  # every row and override is checked before anything runs
    for s in job_seeds:
        check_shared_baseline({name: c for (name, seed), c in cfgs.items() if seed == s})
    todo: list[Job] = []
    for r, s in jobs:
        path = row_dir(out, r.name, s)
        if is_finished(path):
            log.info("row %s seed %d: finished (%s), skipped", r.name, s, path)
            continue
        if path.exists():
            if is_resumable(path, cfgs[r.name, s]):
                log.info("row %s seed %d: unfinished folder %s of the same config: continues from its checkpoints",
                         r.name, s, path)
            else:
                log.warning("row %s seed %d: unfinished folder %s of another config removed, the row runs again",
                            r.name, s, path)
                shutil.rmtree(path)
        todo.append((r, s))
    out.mkdir(parents=True, exist_ok=True)
    # consecutive runs with one seed share one multirun
    groups: list[tuple[int, list[Row]]] = []
    for r, s in todo:
        if groups and groups[-1][0] == s:
            groups[-1][1].append(r)
        else:
            groups.append((s, [r]))
    failed: list[str] = []
    for s, group in groups:
        log.info("seed %d: running %d row(s): %s", s, len(group), ", ".join(r.name for r in group))
        if launcher == "multirun":
            _launch_multirun(group, s, out, [*cfg_over, *hydra_over])
            continue
        for r in group:
            try:
                _run_inprocess(r, s, out, cfg_over)
            except TrainingError as e:  # one diverged run does not stop an unattended sweep
                log.error("row %s seed %d failed: %s; going on with the next run", r.name, s, e)
                failed.append(f"{r.name}@{s} ({e})")
    row_arg = rows if isinstance(rows, str) or rows is None else ",".join(rows)
    command = " ".join(["python scripts/ablate.py", f"--out {out}", *(["--converge"] if converge else []),
                        *([] if rows is None else [f"--rows {row_arg}"]),
                        *([f"--seeds {','.join(map(str, seeds))}"] if seeds_given else []), *overrides])
    md = write_reports(out, command, [(r.name, s) for r, s in jobs] if converge else None)
    if failed:
        raise TrainingError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; the report holds the others ({md})")
    return md


def write_reports(out: str | Path, command: Optional[str] = None,
                  jobs: Optional[list[tuple[str, int]]] = None) -> Path:
    """``ablations.md`` (and its plot) from the finished rows, and with ``jobs`` (the (row, seed) runs of a
    converged sweep) also ``converged.md``, runs not finished shown as pending; returns the ablations.md path."""
    if jobs is not None:
        write_converged(out, jobs, command)
    return write_report(out, command=command)
