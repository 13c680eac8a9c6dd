"""One process against two on the CPU: ``python scripts/bench_ddp.py`` (see bertnmt/experiments/bench_ddp.py, docs/benchmarks.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertnmt.experiments.bench_ddp import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
