"""Run the paper's ablation table and write its report (see docs/ablations.md).

    python scripts/ablate.py [--rows a,b] [--seeds 1,2,3] [--out runs/ablations] [OVERRIDE ...]
    python scripts/ablate.py --converge --rows transformer@1,fused@1,transformer@2 --out runs/converged
    python scripts/ablate.py --report-only [--out runs/ablations] [--converge --rows ... --doc docs/reproduction.md]

OVERRIDEs (``trainer.max_epochs=1``, ``model=iwslt``, ...) go to every row. Finished runs are skipped; an
interrupted run continues from its last checkpoint. ``--converge`` trains every row until its validation
loss stops improving (conf/trainer/converge.yaml); ``NAME@SEED`` items run in the order given.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bertnmt.core.errors import BertNMTError, ConfigError, TrainingInterrupted
from bertnmt.experiments.ablation import LAUNCHERS, run_ablation, write_reports
from bertnmt.experiments.rows import ROWS, parse_seeds, plan_jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. trainer.max_epochs=1")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows or ROW@SEED (default: all): {', '.join(r.name for r in ROWS)}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (mean and spread); default: the config's")
    p.add_argument("--out", default=None,
                   help="the ablation folder (default: runs/ablations, with --converge runs/converged)")
    p.add_argument("--launcher", default="multirun", choices=LAUNCHERS, help="multirun (default) or inprocess")
    p.add_argument("--converge", action="store_true",
                   help="train each row to convergence (early stopping; trainer=converge) and write converged.md")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report(s) from the folder")
    p.add_argument("--doc", default=None, help="with --converge: also put the table into this Markdown file "
                   "(between its converged-table markers)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    out = args.out or ("runs/converged" if args.converge else "runs/ablations")
    try:
        if args.doc and not args.converge:
            raise ConfigError("--doc needs --converge (it holds the converged table)")
        seeds = parse_seeds(args.seeds)
        if args.report_only:
            if not Path(out).is_dir():
                raise ConfigError(f"--out {out}: no such folder, so nothing to report (run the sweep first)")
            jobs = ([(r.name, s) for r, s in plan_jobs(args.rows, seeds or [1])] if args.converge else None)
            md = write_reports(out, jobs=jobs)
        else:
            md = run_ablation(out, args.rows, args.overrides, seeds, args.launcher, converge=args.converge)
        if args.doc:
            from bertnmt.experiments.convergence_report import converged_table, update_doc

            update_doc(args.doc, converged_table(out, [(r.name, s) for r, s in plan_jobs(args.rows, seeds or [1])]))
    except BertNMTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # SIGTERM / SIGINT: the run saved a checkpoint; the same command resumes
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"report: {md} (plot: {md.with_suffix('.png')})")
    if args.converge:
        print(f"converged table: {md.with_name('converged.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
