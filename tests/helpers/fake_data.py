"""Test helper: random prepared data (no corpus, no SentencePiece), the same for every test that asks alike."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bertnmt.data.prepare import PreparedData, Split


class FakeVocab:
    pad_id = 0
    sha256 = "fake"

    def __len__(self) -> int:
        return 50


def fake_data(n: int = 24, max_len: int = 8, with_encoder: bool = True, folder: Path = Path(".")) -> PreparedData:
    """Train and valid splits of ``n`` pairs: ids 4..49, lengths 3..max_len; with the encoder view,
    ids [CLS]=101, 1000..1999 (ids of the tiny BERT), [SEP]=102. Drawn from a fixed seed."""
    rng = np.random.default_rng(0)

    def ids(lo: int, hi: int) -> list[np.ndarray]:
        return [rng.integers(lo, hi, size=int(rng.integers(3, max_len))).astype(np.int32) for _ in range(n)]

    def split(name: str) -> Split:
        enc = [np.concatenate([[101], e, [102]]).astype(np.int32) for e in ids(1000, 2000)] if with_encoder else None
        return Split(name, [""] * n, [""] * n, ids(4, 50), ids(4, 50), enc)

    return PreparedData("fake", folder, FakeVocab(), {"train": split("train"), "valid": split("valid")}, {})  # type: ignore[arg-type]
