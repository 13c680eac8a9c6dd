"""What the cached plain baseline depends on (bertnmt/recipe/baseline.py): the pipeline's cache key and the
ablation runner's shared-baseline check use one definition."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from bertnmt.core.config import Config, to_config
from bertnmt.core.errors import ConfigError
from bertnmt.core.paths import CONF_DIR
from bertnmt.experiments.ablation import check_shared_baseline
from bertnmt.recipe.baseline import FUSION_ONLY, baseline_identity, baseline_inputs, baseline_key

DATA = SimpleNamespace(key="datakey", vocab=SimpleNamespace(sha256="vocabsha"))


def main_job() -> Config:
    from hydra import compose, initialize_config_dir

    from bertnmt.core.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=["+exp=frozen_bert"]))


def test_the_key_of_cached_baselines_still_holds() -> None:
    cfg = main_job()
    assert baseline_key(cfg, DATA) == "32cbfb4a6005405b"  # the key this config had before baseline.py existed


def test_fusion_settings_leave_the_baseline_alone() -> None:
    cfg = main_job()
    fusion = replace(cfg, model=replace(cfg.model, name="other", fused=False, fuse_decoder=False, drop_net=0.3,
                                        fusion_combine="stacked", fuse_layers="first:1", bert_input="embedding"))
    assert set(FUSION_ONLY) <= set(vars(cfg.model))
    assert baseline_identity(fusion) == baseline_identity(cfg) and baseline_key(fusion, DATA) == baseline_key(cfg, DATA)
    # places that do not change the prepared data or the training do not count either
    moved = replace(cfg, data=replace(cfg.data, cache_dir="elsewhere", pad_multiple=8))
    assert baseline_identity(moved) == baseline_identity(cfg)


@pytest.mark.parametrize("change", [
    lambda c: replace(c, model=replace(c.model, d_model=64)),
    lambda c: replace(c, optim=replace(c.optim, lr=c.optim.lr * 2)),
    lambda c: replace(c, trainer=replace(c.trainer, seed=c.trainer.seed + 1)),
    lambda c: replace(c, warm_start=replace(c.warm_start, max_epochs=c.warm_start.max_epochs + 1)),
    lambda c: replace(c, data=replace(c.data, max_tokens=c.data.max_tokens + 1)),
    lambda c: replace(c, data=replace(c.data, vocab_size=c.data.vocab_size + 1)),  # other prepared data
])
def test_what_changes_the_baseline_changes_its_identity(change) -> None:
    cfg = main_job()
    other = change(cfg)
    assert baseline_identity(other) != baseline_identity(cfg)
    if baseline_inputs(other) != baseline_inputs(cfg):  # the data part of the key comes from the prepared data
        assert baseline_key(other, DATA) != baseline_key(cfg, DATA)
    with pytest.raises(ConfigError, match="different warm-start baselines"):
        check_shared_baseline({"a": cfg, "b": other})
