"""Run the paper's ablation table and write its report (see README, "Reproducing the paper's ablations").

    python scripts/ablate.py [--rows a,b] [--seeds 1,2,3] [--out runs/ablations] [OVERRIDE ...]
    python scripts/ablate.py --report-only [--out runs/ablations]

OVERRIDEs (``trainer.max_epochs=1``, ``model=iwslt``, ...) go to every row. Finished rows are skipped.
"""
from __future__ import annotations

import argparse
import logging
import sys

from bertnmt.ablation import LAUNCHERS, ROWS, parse_seeds, run_ablation
from bertnmt.ablation_report import write_report
from bertnmt.errors import BertNMTError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every row, e.g. trainer.max_epochs=1")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all): {', '.join(r.name for r in ROWS)}")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (mean and spread); default: the config's")
    p.add_argument("--out", default="runs/ablations", help="the ablation folder (default: runs/ablations)")
    p.add_argument("--launcher", default="multirun", choices=LAUNCHERS, help="multirun (default) or inprocess")
    p.add_argument("--report-only", action="store_true", help="only rebuild ablations.md/png from the folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        if args.report_only:
            md = write_report(args.out)
        else:
            md = run_ablation(args.out, args.rows, args.overrides, parse_seeds(args.seeds), args.launcher)
    except BertNMTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {md} (plot: {md.with_suffix('.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
