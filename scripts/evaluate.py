"""Decode and score a model with sacreBLEU (BLEU and chrF, with signatures).

    python scripts/evaluate.py runs/frozen_bert/DATE/export --split test --beam 5
    python scripts/evaluate.py runs/.../checkpoints/fused/checkpoint_best.pt --paper-style
    python scripts/evaluate.py runs/.../export --src my.en --ref my.de

Writes <out>.hyp and <out>.json (default: beside the model, eval.<model>.<split>.beam<k>).
"""
from __future__ import annotations

import argparse
import logging
import sys

from bertnmt.cli import tool_exit_code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported folder, a checkpoint (.pt, also an averaged one) or a run directory")
    what = p.add_argument_group("what to decode")
    what.add_argument("--split", default="test", help="a split of the model's configured corpus (default: test)")
    what.add_argument("--src", help="a source file (one sentence a line) instead of a split")
    what.add_argument("--ref", help="references for --src (same number of lines)")
    what.add_argument("--limit", type=int, default=0, help="only the first N sentences (0, the default: all)")
    what.add_argument("--cache-dir", help="prepared-data cache (default: the run's data.cache_dir)")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--beam", type=int, help="beam size (default: the run's eval.beam; 1 = greedy)")
    dec.add_argument("--lenpen", type=float, help="length penalty (default: the run's eval.lenpen)")
    dec.add_argument("--device", default="auto", help="auto | cpu | cuda")
    dec.add_argument("--bert-path", help="where the pretrained encoder is now (same weights as in training)")
    dec.add_argument("--vocab", help="the SentencePiece model, when a checkpoint's own cannot be found")
    dec.add_argument("--config", help="the run's config.yaml, for a checkpoint that carries none (older runs)")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--paper-style", action="store_true",
                    help="the paper's IWSLT'14 BLEU: Moses-tokenised text (sacremoses), tokenize=none, lowercase")
    sc.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")
    sc.add_argument("--tokenize", help="sacreBLEU tokenizer (default: 13a; zh; ko-mecab / ja-mecab where installed)")
    sc.add_argument("--tgt-lang", help="target language for the tokenizer (default: the run's data.tgt_lang)")
    p.add_argument("--out", help="output prefix: writes OUT.hyp and OUT.json")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from bertnmt.inference.evaluate import evaluate, format_record

    def run() -> None:
        rec = evaluate(args.model, split=args.split, src=args.src, ref=args.ref, beam=args.beam, lenpen=args.lenpen,
                       paper_style=args.paper_style, lowercase=args.lowercase, tokenize=args.tokenize,
                       tgt_lang=args.tgt_lang, out=args.out, device=args.device, bert_path=args.bert_path,
                       vocab=args.vocab, limit=args.limit, cache_dir=args.cache_dir, config=args.config)
        print(format_record(rec))

    code = tool_exit_code(run)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
