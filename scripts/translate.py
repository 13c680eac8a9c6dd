"""Translate with a trained model: stdin, a file, or interactively line by line.

    echo "A man is riding a bike." | python scripts/translate.py runs/frozen_bert/DATE/export
    python scripts/translate.py runs/.../export -i input.en --beam 5 --nbest 3 > out.txt
    python scripts/translate.py runs/.../checkpoints/fused/checkpoint_best.pt      # prompts when stdin is a terminal

--nbest N prints fairseq-like lines (S-i source, then H-i<TAB>score<TAB>translation per hypothesis),
or with --format tsv: i<TAB>rank<TAB>score<TAB>translation.

Input is UTF-8; line breaks are LF, CRLF or CR. A file (-i) with a line that is not UTF-8 is refused
before anything is translated; on stdin, the lines before such a line are translated and printed,
then the tool stops with one error line naming it (exit 2). A closed output pipe (| head) ends it
quietly (exit 141).
"""
from __future__ import annotations

import argparse
import logging
import sys
from itertools import islice
from pathlib import Path
from typing import Iterator

from bertnmt.cli import tool_exit_code
from bertnmt.core.errors import DataError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported folder, a checkpoint (.pt) or a run directory")
    p.add_argument("-i", "--input", help="a file to translate (default: stdin)")
    p.add_argument("--beam", type=int, help="beam size (default: the run's eval.beam; 1 = greedy)")
    p.add_argument("--nbest", type=int, default=1, help="hypotheses per sentence (at most --beam)")
    p.add_argument("--lenpen", type=float, help="length penalty (default: the run's eval.lenpen)")
    p.add_argument("--format", choices=["auto", "plain", "fairseq", "tsv"], default="auto",
                   help="auto: plain for --nbest 1, else fairseq")
    p.add_argument("--buffer", type=int, default=512, help="sentences decoded together when not interactive")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--bert-path", help="where the pretrained encoder is now (same weights as in training)")
    p.add_argument("--vocab", help="the SentencePiece model, when a checkpoint's own cannot be found")
    p.add_argument("--config", help="the run's config.yaml, for a checkpoint that carries none (older runs)")
    return p


def chunks(lines: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(lines, size)):
        yield chunk


def prompt(text: str) -> str | None:
    """One line from the terminal (None at Ctrl-D); the prompt never goes into redirected output."""
    if sys.stdout.isatty():
        try:
            return input(text)  # line editing
        except EOFError:
            return None
    print(text, end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    code = tool_exit_code(lambda: translate(args))
    if code:
        raise SystemExit(code)


def translate(args: argparse.Namespace) -> None:
    from bertnmt.data.corpora import StreamLines, read_lines
    from bertnmt.inference.loading import load_model
    from bertnmt.inference.translator import format_hypotheses

    fmt = args.format if args.format != "auto" else ("plain" if args.nbest == 1 else "fairseq")
    sources = read_lines(Path(args.input)) if args.input else None  # a bad file fails before the model loads
    tr = load_model(args.model, device=args.device, bert_path=args.bert_path, vocab=args.vocab, config=args.config)
    beam = tr.check_beam(args.beam, args.nbest)  # a bad --beam / --nbest fails before any input is read

    def emit(first: int, batch: list[str]) -> None:
        for k, (src, hyps) in enumerate(zip(batch, tr.translate_nbest(batch, beam, args.nbest, args.lenpen))):
            print("\n".join(format_hypotheses(first + k, src, hyps, fmt)), flush=True)

    if sources is None and sys.stdin.isatty():  # interactive: one line at a time
        print(f"{tr}\ntype a sentence and press Enter (Ctrl-D quits)", file=sys.stderr)
        n = 0
        while True:
            try:
                line = prompt("> ")
            except UnicodeDecodeError:  # the terminal sent bytes that are not UTF-8: ask again
                print("error: that line is not valid UTF-8; type it again", file=sys.stderr)
                continue
            if line is None:
                break
            emit(n, [line])
            n += 1
        return
    raw = getattr(sys.stdin, "buffer", None) or (line.encode("utf-8", "surrogateescape") for line in sys.stdin)
    stream = StreamLines(raw) if sources is None else None
    n = 0
    for batch in chunks(iter(sources if stream is None else stream), max(1, args.buffer)):
        emit(n, batch)
        n += len(batch)
    if stream is not None and stream.error is not None:
        done = f"; the {n} line(s) before it were translated" if n else ""
        raise DataError(f"{stream.error}{done}")


if __name__ == "__main__":
    main()
