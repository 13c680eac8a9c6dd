#!/usr/bin/env bash
# The Trainer's update (CPU time per update, one thread) before and after the chunked output layer and loss
# (linear_smoothed_loss), interleaved, ROUNDS times; Marian's step once a round. BEFORE is a checkout of the
# code before it (git worktree add ../before <commit>), run with the same Python.
#   BERTNMT_MIRROR=../shared/data BEFORE=../before bash docs/bench/linear_loss.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
AFTER=$PWD
PY=${PYTHON:-python}
for round in $(seq 1 "${1:-2}"); do
  for case in "tiny plain 12" "tiny marian 12" "small plain 6" "small fused_cached 6" "small marian 6"; do
    set -- $case
    codes="before after"; [ "$2" = marian ] && codes=after
    for code in $codes; do
      dir=$AFTER; [ $code = before ] && dir=$BEFORE
      (cd "$dir" && OMP_NUM_THREADS=1 "$PY" -c "
import sys, time
from bertnmt.core.host_memory import tune_host_memory
tune_host_memory()
time.perf_counter = time.process_time  # CPU time: the machine is shared
from bertnmt.experiments.bench import BenchSpec, worker
r = worker(BenchSpec(model='$1', threads=1, steps=$3, warmup=3), '$2')
print('round $round', '$1', '$2', '$code', round(r['step_s'] * 1e3, 1), 'ms/update', round(r['peak_mb']), 'MB peak',
      r['aten_launching'], 'launching /', r['aten_ops'], 'ATen ops,', r['host_syncs'], 'syncs')
" 2>/dev/null | tail -1)
    done
  done
done
