"""scripts/bench.py's workers, in this process, on a toy corpus and a tiny random encoder.

The GPU command of docs/benchmarks.md (8,192-token batches over 3,000 pairs) has fewer batches than warm-up
plus timed updates; the bench must go on into the next epoch, as the Trainer does, not stop."""
from __future__ import annotations

import pytest

from bertnmt.experiments.bench import main, worker
from bertnmt.experiments.bench_spec import BenchSpec, compose_cfg
from tests.helpers.toy_corpus import custom_overrides, write_toy_corpus


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory, bert_path: str) -> BenchSpec:
    tmp = tmp_path_factory.mktemp("bench")
    custom = write_toy_corpus(tmp / "corpus", n_train=120, n_valid=10, n_test=12)
    overrides = custom_overrides(custom) + [f"bert.path={bert_path}", f"data.cache_dir={tmp / 'cache'}",
                                            "data.vocab_size=100"]
    # 120 pairs in 600-token batches: a few batches an epoch, fewer than warm-up + steps (2 + 12)
    return BenchSpec(model="tiny", sentences=120, max_tokens=600, steps=12, warmup=2, decode_sents=12, decode_len=5,
                     beam=2, threads=1, repeat=1, overrides=" ".join(overrides))


def test_overrides_reach_the_config(spec: BenchSpec) -> None:
    cfg = compose_cfg(spec)
    assert cfg.data.corpus == "custom" and cfg.data.max_tokens == 600 and cfg.data.train_limit == 120
    assert cfg.bert.path.endswith("bert") and cfg.model.d_model <= 64


@pytest.mark.parametrize("variant", ["plain", "fused_cached", "fused_finetune"])
def test_training_variants_run_past_the_end_of_an_epoch(spec: BenchSpec, variant: str) -> None:
    r = worker(spec, variant)
    assert r["epoch_batches"] < spec.warmup + spec.steps  # the timed updates crossed an epoch boundary
    assert len(r["shapes"]) == spec.steps and r["step_s"] > 0 and r["tokens_per_s"] > 0
    # the Trainer's own update, counted: no host sync, a handful of optimizer groups
    assert r["host_syncs"] == 0 and 0 < r["aten_launching"] < r["aten_ops"] and r["param_groups"] <= 2
    if variant == "plain":
        assert r["trainable"] == r["total"] and r["encoder_weights_mb"] == 0
    elif variant == "fused_cached":  # the frozen encoder is counted but not trained
        assert r["trainable"] < r["total"] and r["encoder_weights_mb"] > 0
    else:
        assert r["trainable"] == r["total"]


@pytest.mark.parametrize("variant", ["decode_plain", "decode_fused_cached", "decode_fused"])
def test_decoding_forces_every_hypothesis_to_the_same_length(spec: BenchSpec, variant: str) -> None:
    r = worker(spec, variant)
    assert r["sentences"] == spec.decode_sents
    assert r["tokens_out"] == spec.decode_sents * (spec.decode_len + 1)  # decode_len tokens + eos each


def test_unknown_variant_is_one_line_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--variants", "plain,nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err

