"""Test helper: a tiny plain-Transformer model exported as ``scripts/export.py`` does, without training.

A custom corpus of a few toy sentences is prepared (SentencePiece of 60 pieces), a random
``model=tiny``-sized Transformer is saved as the ``checkpoint_best.pt`` of a run folder, and the run
is exported. Its translations are nonsense, but every tool (evaluate, translate, export, average)
runs on it in a second or two.
"""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

WORDS = "the a cat dog man woman sees likes runs to house red big small green tree car bird".split()


def write_corpus(root: Path, n_train: int = 30, n_eval: int = 5) -> dict[str, Path]:
    """``{split}.{en,de}`` files (the target is the source reversed); returns ``"train.src" -> path``."""
    rng = random.Random(1)
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "valid", "test"):
        n = n_train if split == "train" else n_eval
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]
        for side, lang in (("src", "en"), ("tgt", "de")):
            path = root / f"{split}.{lang}"
            path.write_text("".join((line[::-1] if side == "tgt" else line) + "\n" for line in lines), encoding="utf-8")
            files[f"{split}.{side}"] = path
    return files


def make_run(root: Path) -> Path:
    """A run folder (``config.yaml``, ``checkpoints/baseline/checkpoint_best.pt``) and its ``export/``."""
    from bertnmt.train.checkpoint import model_weights, save_checkpoint
    from bertnmt.core.config import Config, DataConfig, ModelConfig
    from bertnmt.data.prepare import prepare_data
    from bertnmt.recipe.export import export_model
    from bertnmt.model.build import make_model

    files = write_corpus(root / "corpus")
    custom = {split: {"src": str(files[f"{split}.src"]), "tgt": str(files[f"{split}.tgt"])}
              for split in ("train", "valid", "test")}
    cfg = Config(name="tiny_tools")
    cfg.model = ModelConfig(name="tiny", d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, fused=False)
    cfg.data = DataConfig(corpus="custom", src_lang="en", tgt_lang="de", custom=custom, vocab_size=60,
                          cache_dir=str(root / "cache"), mirror=None)
    cfg.eval.beam = 2
    cfg.eval.max_len_b = 10
    cfg.trainer.device = "cpu"
    run = root / "run"
    cfg.output_dir = str(run)
    data = prepare_data(cfg.data)
    model = make_model(cfg, len(data.vocab), data.vocab.pad_id)
    run.mkdir(parents=True)
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml")
    meta = {"config": asdict(cfg), "model": asdict(cfg.model), "data_key": data.key,
            "vocab_sha256": data.vocab.sha256, "vocab_size": len(data.vocab)}
    save_checkpoint(run / "checkpoints" / "baseline" / "checkpoint_best.pt",
                    {"model": model_weights(model, include_bert=False), "epoch": 1, "step": 10, "meta": meta})
    export_model(run, run / "export")
    return run
