"""Checkpoints: atomic, safe to load, and a warm start that loads every NMT weight or says why not."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bertnmt.train.checkpoint import FORMAT_VERSION, load_checkpoint, model_weights, save_checkpoint, warm_start
from bertnmt.core.config import BertConfig, ModelConfig
from bertnmt.core.errors import CheckpointError
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from tiny_encoder import make_tiny_bert

TINY = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2)
PLAIN = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, fused=False)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def save_plain(path: Path, cfg: ModelConfig = PLAIN, vocab: int = 60, sha: str = "a" * 64) -> BertFusedTransformer:
    torch.manual_seed(3)
    plain = BertFusedTransformer(cfg, vocab, 0, None)
    save_checkpoint(path, {"model": model_weights(plain, include_bert=False), "meta": {"vocab_sha256": sha}})
    return plain


def test_warm_start_loads_every_nmt_weight(tmp_path: Path, bert_path: str) -> None:
    plain = save_plain(tmp_path / "plain.pt")
    fused = BertFusedTransformer(TINY, 60, 0, PretrainedEncoder(BertConfig(path=bert_path)))
    new = warm_start(fused, tmp_path / "plain.pt", "a" * 64)
    assert new and all(".bert_attn." in k for k in new)
    ours = fused.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(ours[k], v), k


def test_warm_start_refuses_another_vocabulary(tmp_path: Path, bert_path: str) -> None:
    save_plain(tmp_path / "plain.pt", sha="b" * 64)
    fused = BertFusedTransformer(TINY, 60, 0, PretrainedEncoder(BertConfig(path=bert_path)))
    with pytest.raises(CheckpointError, match="another vocabulary"):
        warm_start(fused, tmp_path / "plain.pt", "a" * 64)


def test_warm_start_refuses_other_dimensions(tmp_path: Path, bert_path: str) -> None:
    save_plain(tmp_path / "plain.pt", vocab=70)
    fused = BertFusedTransformer(TINY, 60, 0, PretrainedEncoder(BertConfig(path=bert_path)))
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight has shape \(70, 32\)"):
        warm_start(fused, tmp_path / "plain.pt", "a" * 64)


def test_save_is_atomic_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    assert load_checkpoint(path)["format_version"] == FORMAT_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left behind


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    old = tmp_path / "old.pt"
    torch.save({"model": {}, "format_version": 0}, old)
    with pytest.raises(CheckpointError, match="format version 0"):
        load_checkpoint(old)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
