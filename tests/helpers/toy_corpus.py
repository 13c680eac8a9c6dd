"""Test helper: a tiny synthetic parallel corpus (a word-for-word toy language pair), written to files."""
from __future__ import annotations

import random
from pathlib import Path

SRC_WORDS = ("the a man woman dog cat child boy girl ball red blue green big small runs walks sits plays "
             "eats sees holds street park water grass house car with on in near under").split()
TGT_WORDS = ("der ein mann frau hund katze kind junge maedchen ball rot blau gruen gross klein laeuft geht "
             "sitzt spielt isst sieht haelt strasse park wasser gras haus auto mit auf in nahe unter").split()


def write_toy_corpus(folder: str | Path, n_train: int = 300, n_valid: int = 20, n_test: int = 20,
                     seed: int = 0) -> dict[str, dict[str, str]]:
    """Write ``<split>.en`` / ``<split>.de`` (3 to 9 words a sentence); returns ``data.custom``."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    custom = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        src, tgt = [], []
        for _ in range(n):
            idx = [rng.randrange(len(SRC_WORDS)) for _ in range(rng.randint(3, 9))]
            src.append(" ".join(SRC_WORDS[i] for i in idx))
            tgt.append(" ".join(TGT_WORDS[i] for i in idx))
        (folder / f"{split}.en").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
        custom[split] = {"src": str(folder / f"{split}.en"), "tgt": str(folder / f"{split}.de")}
    return custom


def custom_overrides(custom: dict[str, dict[str, str]]) -> list[str]:
    """Hydra overrides that select these files as ``data=custom``."""
    return ["data=custom"] + [f"+data.custom.{s}.{side}={p}"
                              for s, sides in custom.items() for side, p in sides.items()]
