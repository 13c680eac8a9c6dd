"""The main job end to end at toy size: baseline -> warm start -> fused, on the real corpus (through the mirror)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
from hydra import compose, initialize_config_dir

from bertnmt.core.config import Config, register_configs, to_config
from bertnmt.recipe.pipeline import run
from tiny_encoder import make_tiny_bert

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def smoke_cfg(tmp_path: Path, bert_path: str, overrides: list[str], out: str) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=[
            "model=tiny", f"bert.path={bert_path}", "bert.name=tiny-bert",
            f"data.cache_dir={tmp_path / 'cache'}", "data.train_limit=60", "data.valid_limit=12",
            "data.test_limit=12", "data.vocab_size=300", "data.max_tokens=400",
            "trainer.max_epochs=2", "trainer.progress=false", "trainer.tensorboard=false",
            "optim.warmup_steps=10", "optim.lr=1e-3", "eval.beam=2", "warm_start.max_epochs=2", *overrides,
        ])
    cfg = to_config(dcfg)
    cfg.output_dir = str(tmp_path / out)
    return cfg


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.mark.slow
def test_two_stage_recipe_writes_results_and_reuses_baseline(tmp_path: Path, tiny_bert: str, mirror: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    cfg = smoke_cfg(tmp_path, tiny_bert, ["+exp=frozen_bert"], "run1")
    summary = run(cfg)
    run_dir = Path(cfg.output_dir)
    records = read_jsonl(run_dir / "results.jsonl")
    epochs = [r for r in records if "epoch" in r]
    # baseline, fused, then the plain Transformer continued from the same warm start (equal budget)
    assert [(r["stage"], r["epoch"]) for r in epochs][:4] == [("baseline", 1), ("baseline", 2), ("fused", 1), ("fused", 2)]
    assert {r["stage"] for r in epochs[4:]} == {"transformer"}
    for r in epochs:
        for key in ("epoch_time_s", "tokens_per_s", "train_loss", "valid_loss", "valid_bleu", "trainable_params",
                    "total_params", "peak_mem_mb"):
            assert key in r, key
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
    fused = [r for r in epochs if r["stage"] == "fused"]
    base = [r for r in epochs if r["stage"] == "baseline"]
    # the frozen encoder is counted in total but not in trainable; BERT attention adds trainable weights
    assert fused[0]["trainable_params"] > base[0]["trainable_params"]
    assert fused[0]["total_params"] - fused[0]["trainable_params"] == fused[0]["params_by_group"]["bert"]["total"]

    # the BLEU we report is what sacreBLEU computes from the hypothesis file we wrote
    tests = {r["stage"]: r for r in records if r.get("split") == "test"}
    assert set(tests) == {"baseline", "fused", "transformer"}
    refs = (run_dir / "test.ref").read_text(encoding="utf-8").splitlines()
    for stage, rec in tests.items():
        hyps = (run_dir / rec["hypotheses"]).read_text(encoding="utf-8").splitlines()
        assert len(hyps) == len(refs) == 12
        direct = sacrebleu.corpus_bleu(hyps, [refs])
        assert rec["bleu"] == pytest.approx(round(direct.score, 2), abs=1e-9)
        assert rec["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
        assert all("<unk>" not in h for h in hyps)

    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["encoder"]["path"] == tiny_bert and len(meta["encoder"]["weights_sha256"]) == 64
    assert meta["sacrebleu_signature"] == tests["fused"]["bleu_signature"]
    assert (run_dir / "config.yaml").is_file()
    assert summary["epoch_time_ratio"] > 0
    # equal budget: the continued Transformer made exactly the fused stage's updates, from the same checkpoint
    fused_steps = fused[-1]["step"]
    plain = [r for r in epochs if r["stage"] == "transformer"]
    assert fused_steps > 0 and plain[-1]["step"] == fused_steps == summary["transformer"]["steps"] == summary["fused"]["steps"]
    eq = summary["equal_budget"]
    assert eq["updates"] == {"fused": fused_steps, "transformer": fused_steps}
    assert eq["bleu_delta"] == pytest.approx(tests["fused"]["bleu"] - tests["transformer"]["bleu"], abs=0.011)
    bs = eq["paired_bootstrap"]["bleu"]
    assert bs["system"] == tests["fused"]["bleu"] and bs["baseline"] == tests["transformer"]["bleu"]
    assert 0 < bs["p_value"] <= 1 and bs["system_ci"][0] <= bs["system_ci"][1]
    printed = capsys.readouterr().out
    assert "equal budget: BERT-fused and the Transformer both continue the same warm start" in printed
    assert "Transformer (continued)" in printed and "paired bootstrap" in printed
    # the frozen encoder is not stored in the checkpoints
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "fused" / "checkpoint_best.pt", weights_only=True)
    assert not any(k.startswith("bert.") for k in ckpt["model"])
    assert any(".bert_attn." in k for k in ckpt["model"])

    # second run: same data, vocabulary and settings -> the baseline is reused, not retrained
    cfg2 = smoke_cfg(tmp_path, tiny_bert, ["+exp=frozen_bert"], "run2")
    summary2 = run(cfg2)
    assert "reused_from" in summary2["baseline"]
    stages2 = {r["stage"] for r in read_jsonl(Path(cfg2.output_dir) / "results.jsonl") if "epoch" in r}
    assert stages2 == {"fused"}  # the continued Transformer is cached too
    assert summary2["baseline"]["test_bleu"] == summary["baseline"]["test_bleu"]
    assert "reused_from" in summary2["transformer"] and summary2["transformer"]["test_bleu"] == summary["transformer"]["test_bleu"]
    assert summary2["equal_budget"]["paired_bootstrap"]["bleu"]["baseline"] == bs["baseline"]
