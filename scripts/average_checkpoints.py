"""Average checkpoints into a new one (which evaluate, translate and export accept).

    python scripts/average_checkpoints.py runs/frozen_bert/DATE --last 5 --out avg5.pt
    python scripts/average_checkpoints.py a.pt b.pt c.pt --out avg.pt

With --last N, the argument is a run directory (its final stage) or a checkpoint folder, and the
N checkpoints with the highest training steps are averaged.
"""
from __future__ import annotations

import argparse
import logging
import sys

from bertnmt.cli import tool_exit_code
from bertnmt.core.errors import BertNMTError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="checkpoints, or with --last one run directory / checkpoint folder")
    p.add_argument("--last", type=int, help="average the last N checkpoints of the folder")
    p.add_argument("--out", required=True, help="the averaged checkpoint to write")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from bertnmt.train.averaging import average_checkpoints, last_checkpoints

    def run() -> None:
        if args.last is not None:
            if len(args.inputs) != 1:
                raise BertNMTError("--last takes one run directory or checkpoint folder")
            paths = last_checkpoints(args.inputs[0], args.last)
        else:
            paths = args.inputs
        out = average_checkpoints(paths, args.out)
        print(f"averaged {len(paths)} checkpoints into {out}:")
        print("\n".join(f"  {p}" for p in paths))

    code = tool_exit_code(run)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
