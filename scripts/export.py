"""Export a run's final model (or any checkpoint) as a folder that bertnmt.load_model() restores.

    python scripts/export.py runs/frozen_bert/DATE my_model
    python scripts/export.py avg5.pt my_model_avg5

A run already exports its final model to <run>/export at its end.
"""
from __future__ import annotations

import argparse
import logging
import sys

from bertnmt.cli import tool_exit_code


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run directory or a checkpoint (.pt)")
    p.add_argument("out", help="the folder to write: new, empty, or an earlier export (replaced; other files in it are kept)")
    p.add_argument("--vocab", help="the SentencePiece model, when a checkpoint's own cannot be found")
    p.add_argument("--config", help="the run's config.yaml, for a checkpoint that carries none (older runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from bertnmt.recipe.export import export_model

    code = tool_exit_code(lambda: print(export_model(args.source, args.out, vocab=args.vocab, config=args.config)))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
