"""One process against N processes (``scripts/bench_ddp.py``, docs/benchmarks.md).

Runs ``scripts/train.py`` on the same data and config three ways and reads the target tokens/s that
the trainer logs (all ranks' target tokens over rank 0's wall time of the timed training epoch):

- ``1 proc x T threads``: one process using the whole CPU budget (``OMP_NUM_THREADS=T``);
- ``1 proc x 1 thread``: one process, one thread (the per-process share of the DDP run);
- ``N procs x 1 thread``: ``torchrun --nproc_per_node=N`` (gloo on the CPU), one thread each.

The N-process run makes ``steps / N`` updates of N batches each, so every run trains on the same
batches (the first ``steps`` batches of the epoch's list). Validation, test decoding and the export
are outside the timed epoch. Default: the plain Transformer (``model=small model.fused=false``) on the
prepared Multi30k; extra Hydra overrides after ``--``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bertnmt.core.paths import PROJECT_ROOT, TRAIN_SCRIPT

BASE = ["model=small", "model.fused=false", "trainer.max_epochs=1", "trainer.valid_bleu=false",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.device=cpu", "eval.test=false", "name=bench_ddp"]


def train_cmd(nproc: int) -> list[str]:
    script = str(TRAIN_SCRIPT)
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]


def run_one(label: str, nproc: int, threads: int, steps: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """One training run; its epoch record from results.jsonl plus the wall time of the whole command."""
    run_dir = out / label.replace(" ", "_")
    cmd = [*train_cmd(nproc), *BASE, f"trainer.max_steps={steps // nproc}", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    (rec,) = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if '"epoch"' in line]
    return {"run": label, "processes": nproc, "threads_each": threads, "updates": rec["step"],
            "train_tokens": rec["train_tokens"], "epoch_time_s": round(rec["epoch_time_s"], 2),
            "tokens_per_s": round(rec["tokens_per_s"], 1), "train_loss": round(rec["train_loss"], 4),
            "command_s": round(wall, 1), "command": " ".join(cmd[1:])}


def markdown(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["tokens_per_s"]
    lines = ["| run | updates | target tokens | timed epoch (s) | target tok/s | vs first row | train loss | whole command (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['updates']} | {r['train_tokens']:,} | {r['epoch_time_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | {r['train_loss']:.4f} | {r['command_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Hydra overrides for every run go after --, e.g. -- data.max_tokens=4096")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the DDP run (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the single process that uses the whole CPU (default: all cores)")
    ap.add_argument("--steps", type=int, default=64, help="batches trained by every run (a multiple of --nproc)")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / "bench_ddp", help="run folders and results.json")
    ap.add_argument("extra", nargs="*", help="Hydra overrides")
    args = ap.parse_args(argv)
    if args.steps % args.nproc:
        ap.error(f"--steps={args.steps} must be a multiple of --nproc={args.nproc}")
    out = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    plan = [(f"1 proc x {args.threads} threads", 1, args.threads), ("1 proc x 1 thread", 1, 1),
            (f"{args.nproc} procs x 1 thread", args.nproc, 1)]
    load = os.getloadavg()
    rows = [run_one(label, n, t, args.steps, out, args.extra) for label, n, t in plan]
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_before": [round(x, 2) for x in load],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(), "rows": rows}
    from bertnmt.core.atomic import write_json

    write_json(out / "results.json", report)
    print(markdown(rows))
    print(f"load average before {report['loadavg_before']}, after {report['loadavg_after']}; {out / 'results.json'}")
    return 0
