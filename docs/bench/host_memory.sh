#!/usr/bin/env bash
# The Trainer's update (CPU time per update, one thread) with the host allocator as glibc leaves it and as
# bertnmt.core.host_memory sets it up, interleaved, ROUNDS times; Marian's step in the same processes' setup.
#   BERTNMT_MIRROR=../shared/data bash docs/bench/host_memory.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
for round in $(seq 1 "${1:-2}"); do
  for case in "tiny plain 12" "tiny marian 12" "small plain 6" "small fused_cached 6" "small marian 6"; do
    set -- $case
    for setting in default tuned; do
      env -u THP_MEM_ALLOC_ENABLE BERTNMT_HOST_MEMORY=$setting OMP_NUM_THREADS=1 "$PY" -c "
import sys, time
from bertnmt.core.host_memory import tune_host_memory
tune_host_memory()
time.perf_counter = time.process_time  # CPU time: the machine is shared
from bertnmt.experiments.bench import BenchSpec, worker
r = worker(BenchSpec(model='$1', threads=1, steps=$3, warmup=3), '$2')
print('round $round', '$1', '$2', '$setting', round(r['step_s'] * 1e3, 1), 'ms/update', round(r['peak_mb']), 'MB peak')
" 2>/dev/null | tail -1
    done
  done
done
