"""Speed and memory, side by side: ``python scripts/bench.py`` (see bertnmt/experiments/bench.py and docs/benchmarks.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertnmt.experiments.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
