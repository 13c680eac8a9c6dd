"""The freeze policy on the fused model: presets through Hydra, bit-identical frozen weights, no graph for a frozen
encoder, unfreeze from that very step, policy-independent optimizer, config errors, trainer reports and exact resume."""
from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bertnmt.core.config import (BertConfig, Config, DataConfig, FreezeConfig, FreezeRule, ModelConfig, OptimConfig,
                            TrainerConfig, register_configs, to_config)
from bertnmt.data.prepare import PreparedData
from bertnmt.core.errors import ConfigError
from bertnmt.train.freeze import FreezePolicy
from bertnmt.train.optim import load_optimizer_state, optimizer_state
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from bertnmt.train.trainer import Trainer, smoothed_loss
from fake_data import fake_data as shared_fake_data
from tiny_encoder import make_tiny_bert

TINY = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1)
ROOT = Path(__file__).resolve().parents[1]
register_configs()


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def fused_model(bert_path: str, cfg: ModelConfig = TINY) -> BertFusedTransformer:
    torch.manual_seed(0)
    random.seed(0)  # drop-net draws come from Python's RNG: the same branches whatever ran before
    bert = PretrainedEncoder(BertConfig(path=bert_path))
    return BertFusedTransformer(cfg, vocab_size=50, pad_id=0, bert=bert)


def batch(vocab: int = 50, bert_vocab: int = 100) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, vocab, (3, 7), generator=g)  # (B, S)
    tgt = torch.randint(4, vocab, (3, 6), generator=g)  # (B, T)
    enc = torch.randint(5, bert_vocab, (3, 9), generator=g)  # (B, E)
    mask = torch.ones_like(enc)
    mask[0, 6:] = 0
    return src, tgt, enc, mask


def train_steps(model: BertFusedTransformer, policy: FreezePolicy, steps: int, weight_decay: float = 0.1) -> None:
    opt = torch.optim.AdamW(policy.param_groups(model, OptimConfig()), lr=1e-2, weight_decay=weight_decay)
    src, tgt, enc, mask = batch()
    model.train()
    for _ in range(steps):
        logits = model(src, tgt, enc, mask)
        loss, _ = smoothed_loss(logits, tgt, 0, 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_frozen_encoder_is_bit_identical_and_in_eval_mode(bert_path: str) -> None:
    model = fused_model(bert_path)
    policy = FreezePolicy(FreezeConfig(policy="frozen"))
    policy.apply(model)
    before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    nmt_before = model.encoder.layers[0].bert_attn.q_proj.weight.clone() if hasattr(
        model.encoder.layers[0].bert_attn, "q_proj") else None
    train_steps(model, policy, steps=4)
    model.train()
    assert not any(m.training for m in model.bert.modules()), "frozen encoder must stay in eval mode"
    assert all(not p.requires_grad for p in model.bert.parameters())
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, before[k]), k
    if nmt_before is not None:
        assert not torch.equal(model.encoder.layers[0].bert_attn.q_proj.weight, nmt_before)
    # the optimizer groups hold every parameter (a later unfreeze needs no new optimizer)
    groups = policy.param_groups(model, OptimConfig())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_trains_the_encoder(bert_path: str) -> None:
    # drop-net off, so that the BERT branch runs in every layer and the encoder surely gets a gradient
    model = fused_model(bert_path, ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, drop_net=0.0))
    policy = FreezePolicy(FreezeConfig(policy="finetune"))
    policy.apply(model)
    before = {k: v.clone() for k, v in model.bert.named_parameters()}
    train_steps(model, policy, steps=2)
    assert model.bert.training is True
    changed = [k for k, v in model.bert.named_parameters() if not torch.equal(v, before[k])]
    assert changed


def test_report_counts_per_group(bert_path: str) -> None:
    model = fused_model(bert_path)
    policy = FreezePolicy(FreezeConfig(policy="frozen"))
    policy.apply(model)
    rep = policy.report(model)
    bert_total = sum(p.numel() for p in model.bert.parameters())
    assert rep["total_params"] == sum(p.numel() for p in model.parameters())
    assert rep["trainable_params"] == rep["total_params"] - bert_total
    assert rep["params_by_group"]["bert"] == {"trainable": 0, "total": bert_total}
    assert rep["params_by_group"]["fusion"]["trainable"] > 0


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="freeze.policy='thaw'"):
        FreezePolicy(FreezeConfig(policy="thaw"))


# ---------------------------------------------------------------------------------------------------
# The policy engine on the fused model: presets, guarantees, errors, trainer integration, resume.
# ---------------------------------------------------------------------------------------------------
def compose_freeze(overrides: list[str]) -> FreezeConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides)).freeze


def bert_layer_params(model: BertFusedTransformer, k: int) -> int:
    return sum(p.numel() for n, p in model.bert.named_parameters() if f".layer.{k}." in n)


def run_updates(model: BertFusedTransformer, policy: FreezePolicy, opt: torch.optim.Optimizer, steps: range,
                accum: int = 1, amp: bool = False) -> None:
    """Updates ``steps`` (0-based) the way the Trainer does them: apply, forward/backward (x accum), scale lrs, step."""
    src, tgt, enc, mask = batch()
    for step in steps:
        model.train()
        policy.apply(model, step=step)
        for _ in range(accum):
            with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
                logits = model(src, tgt, enc, mask)  # (B, T, V)
            loss, _ = smoothed_loss(logits, tgt, 0, 0.1)
            (loss / accum).backward()
        policy.scale_lrs(opt, [1e-2] * len(opt.param_groups))
        opt.step()
        opt.zero_grad(set_to_none=True)


def bert_snapshot(model: BertFusedTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.bert.state_dict().items()}


@pytest.mark.parametrize("case", ["weight_decay", "adam_state", "accumulation", "autocast"])
def test_frozen_parameters_are_bit_identical(bert_path: str, case: str) -> None:
    """Steps 0-1 train the encoder (Adam state), steps 2-5 freeze it: it must not move at all."""
    model = fused_model(bert_path)
    rules = [FreezeRule(match="group:bert", frozen=False, end=2), FreezeRule(match="group:bert", start=2)]
    cfg = FreezeConfig(policy="rules", unit="step", rules=rules) if case == "adam_state" else FreezeConfig(policy="frozen", unit="step")
    policy = FreezePolicy(cfg)
    opt = torch.optim.AdamW(policy.param_groups(model, OptimConfig()), lr=1e-2, weight_decay=0.1)
    if case == "adam_state":
        run_updates(model, policy, opt, range(0, 2))
        word = model.bert.model.embeddings.word_embeddings.weight
        assert opt.state[word]["exp_avg"].abs().sum() > 0  # momentum left over from the trainable phase
    before, fusion = bert_snapshot(model), model.decoder.layers[0].bert_attn.q_proj.weight.detach().clone()
    run_updates(model, policy, opt, range(2, 6), accum=2 if case == "accumulation" else 1, amp=case == "autocast")
    for k, v in model.bert.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in model.bert.parameters())
    assert not torch.equal(model.decoder.layers[0].bert_attn.q_proj.weight, fusion)  # the rest did train


def test_zero_gradients_would_move_frozen_weights() -> None:
    """The control for the test above: AdamW moves a weight whose grad is zero (not None)."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.ones(4)
    opt.step()
    before = w.detach().clone()
    w.grad = torch.zeros(4)
    opt.step()
    assert not torch.equal(w, before)
    moved = w.detach().clone()
    w.grad = None
    opt.step()
    assert torch.equal(w, moved)


def saved_bytes(model: BertFusedTransformer) -> tuple[int, torch.Tensor]:
    """Bytes autograd saves for backward in one training forward, and H_B (B, E, Hb)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    src, tgt, enc, mask = batch()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h_b = model.bert(enc, mask)
        smoothed_loss(model(src, tgt, enc, mask), tgt, 0, 0.1)[0].backward()
    return total, h_b


def test_frozen_encoder_keeps_no_graph_and_no_dropout(bert_path: str) -> None:
    results = {}
    for name in ("frozen", "finetune"):
        model = fused_model(bert_path)
        policy = FreezePolicy(FreezeConfig(policy=name))
        policy.apply(model)
        results[name] = saved_bytes(model)
        src, tgt, enc, mask = batch()
        same = torch.equal(model.bert(enc, mask), model.bert(enc, mask))  # dropout off <=> identical outputs
        assert same == (name == "frozen")
        if name == "frozen":
            assert all(p.grad is None for p in model.bert.parameters())
    (frozen, h_frozen), (tuned, h_tuned) = results["frozen"], results["finetune"]
    assert not h_frozen.requires_grad and h_frozen.grad_fn is None
    assert h_tuned.grad_fn is not None
    # the encoder's activations are what finetune keeps and frozen does not (saved-tensor bytes)
    assert tuned - frozen > 0.25 * tuned, (frozen, tuned)


def test_unfreeze_trains_from_that_very_step_with_warmup(bert_path: str) -> None:
    # drop-net off: with p_net = 1 a step may skip every BERT branch, and then the encoder gets no gradient
    model = fused_model(bert_path, ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, drop_net=0.0))
    policy = FreezePolicy(FreezeConfig(policy="unfreeze_after", unit="step", unfreeze_at=2, warmup=3, bert_lr_mult=0.5))
    opt = torch.optim.AdamW(policy.param_groups(model, OptimConfig()), lr=1e-2)
    word = "bert.model.encoder.layer.0.attention.self.query.weight"
    moved, lrs = [], []
    for step in range(6):
        before = bert_snapshot(model)
        run_updates(model, policy, opt, range(step, step + 1))
        moved.append(any(not torch.equal(v, before[k]) for k, v in model.bert.state_dict().items()))
        lrs.append(next(g["lr"] for g in opt.param_groups if word in g["names"]))
    assert moved == [False, False, True, True, True, True]
    assert lrs == pytest.approx([0.0, 0.0, 1e-2 * 0.5 / 3, 1e-2 * 0.5 * 2 / 3, 1e-2 * 0.5, 1e-2 * 0.5])
    assert model.bert.training and not model.bert.frozen


PRESET_POLICIES = [
    FreezeConfig(policy="frozen"), FreezeConfig(policy="finetune", bert_lr_mult=0.1),
    FreezeConfig(policy="unfreeze_after", unfreeze_at=3), FreezeConfig(policy="gradual", every=2),
    FreezeConfig(policy="nmt_frozen", until=2), FreezeConfig(policy="rules", unit="step", rules=[
        FreezeRule(match="group:embeddings"), FreezeRule(match="group:bert.layer.-1", frozen=False, lr_mult=3.0)]),
]


def test_optimizer_groups_are_freeze_classes_and_state_resumes_across_policies(bert_path: str) -> None:
    for cfg in PRESET_POLICIES:
        model = fused_model(bert_path)
        policy = FreezePolicy(cfg)
        policy.apply(model, epoch=1, step=0)
        groups = policy.param_groups(model, OptimConfig())
        names = [n for g in groups for n in g["names"]]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # every parameter, once
        assert len(groups) < 20 < len(names)  # a handful of classes, not one group per tensor
        for pos in policy.boundaries() + [policy.boundaries()[-1] + 1]:  # one class: one state at every position
            trainable, mult = policy.state_at(pos)
            for g in groups:
                assert len({(trainable[n], mult[n]) for n in g["names"]}) == 1, (cfg.policy, pos, g["name"])
    # a checkpoint taken under `frozen` (no encoder state) loads into a `gradual` optimizer, which then trains it
    # (drop-net off: with p_net = 1 a step may skip every BERT branch, and then the encoder gets no gradient)
    model = fused_model(bert_path, ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, drop_net=0.0))
    frozen = FreezePolicy(FreezeConfig(policy="frozen"))
    opt = torch.optim.AdamW(frozen.param_groups(model, OptimConfig()), lr=1e-2)
    run_updates(model, frozen, opt, range(0, 2))
    state = optimizer_state(opt)
    tuned = FreezePolicy(FreezeConfig(policy="gradual", every=1))  # one class per encoder layer
    opt2 = torch.optim.AdamW(tuned.param_groups(model, OptimConfig()), lr=1e-2)
    assert len(opt2.param_groups) > len(opt.param_groups)  # another grouping
    load_optimizer_state(opt2, state)
    fc1 = model.encoder.layers[0].ffn.fc1.weight
    assert torch.equal(opt2.state[fc1]["exp_avg"], opt.state[fc1]["exp_avg"])  # found by name
    assert not any(p in opt2.state for p in model.bert.parameters())  # never trained: no state
    before = bert_snapshot(model)
    tuned.apply(model, epoch=3)  # the top layers train from epoch 2
    run_updates(model, tuned, opt2, range(2, 3))
    assert any(not torch.equal(v, before[k]) for k, v in model.bert.state_dict().items())


def trainable_by_group(policy: FreezePolicy, model: BertFusedTransformer, epoch: int) -> dict[str, int]:
    model.train()
    policy.apply(model, epoch=epoch)
    return {g: c["trainable"] for g, c in policy.report(model)["params_by_group"].items()}


@pytest.mark.parametrize("preset", ["frozen", "finetune", "unfreeze_after", "gradual", "nmt_frozen", "rules"])
def test_every_preset_through_hydra(bert_path: str, preset: str) -> None:
    cfg = compose_freeze([f"freeze={preset}", "freeze.unfreeze_at=2" if preset == "unfreeze_after" else
                          "freeze.until=3" if preset == "nmt_frozen" else "freeze.dry_run=false"])
    model = fused_model(bert_path)
    policy = FreezePolicy(cfg)
    totals = {g: c["total"] for g, c in policy.report(model)["params_by_group"].items()}
    bert, l0, l1 = totals["bert"], bert_layer_params(model, 0), bert_layer_params(model, 1)
    nmt = {g: totals[g] for g in ("encoder", "decoder", "embeddings")}
    seen = [trainable_by_group(policy, model, e) for e in (1, 2, 3, 4)]
    if preset == "frozen":
        assert [s["bert"] for s in seen] == [0, 0, 0, 0] and seen[0]["decoder"] == totals["decoder"]
    elif preset == "finetune":
        assert [s["bert"] for s in seen] == [bert] * 4
    elif preset == "unfreeze_after":
        assert [s["bert"] for s in seen] == [0, bert, bert, bert]
    elif preset == "gradual":  # top block, then the one below, then the embeddings
        assert [s["bert"] for s in seen] == [l1, l1 + l0, bert, bert]
    elif preset == "nmt_frozen":
        assert all(s["fusion"] == totals["fusion"] and s["bert"] == 0 for s in seen)
        assert [{g: s[g] for g in nmt} for s in seen] == [{g: 0 for g in nmt}] * 2 + [nmt] * 2
    else:  # conf/freeze/rules.yaml: bert frozen in epochs 1-2, lr x0.1 from 3; embeddings fixed
        assert [s["bert"] for s in seen] == [0, 0, bert, bert] and all(s["embeddings"] == 0 for s in seen)
        assert policy.lr_mult("decoder.layers.0.bert_attn.q_proj.weight") == 2.0
        assert policy.lr_mult("bert.model.embeddings.word_embeddings.weight") == 0.1


def rules_cfg(*rules: FreezeRule, **kw) -> FreezeConfig:
    return FreezeConfig(policy=kw.pop("policy", "rules"), rules=list(rules), **kw)


@pytest.mark.parametrize("cfg, message", [
    (rules_cfg(FreezeRule(frozen=True)), r"^freeze.rules\[0\].match is empty$"),
    (rules_cfg(FreezeRule(match="decoder.layers.*", start=3, end=3)), r"freeze.rules\[0\]: window \[3, 3\) is empty"),
    (rules_cfg(FreezeRule(match="decoder.layers.*", end=1)), r"freeze.rules\[0\]: window \[1, 1\) is empty"),
    (rules_cfg(FreezeRule(match="decoder.layers.*", start=0)), r"freeze.rules\[0\].start=0 is before the first epoch"),
    (rules_cfg(FreezeRule(match="re:(")), r"freeze.rules\[0\].match='re:\(' is not a valid regular expression"),
    (rules_cfg(FreezeRule(match="group:bert.layer.top")), r"unknown parameter group 'bert.layer.top'"),
    (rules_cfg(FreezeRule(match="fc2.*"), unit="epochs"), r"freeze.unit='epochs' is not one of epoch, step"),
    (FreezeConfig(policy="unfreeze_after"), r"freeze.unfreeze_at=null"),
    (FreezeConfig(policy="gradual", every=0), r"freeze.every=0"),
])
def test_config_errors_without_a_model(cfg: FreezeConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FreezePolicy(cfg)


@pytest.mark.parametrize("cfg, message", [
    (rules_cfg(FreezeRule(match="encoder.layers.*"), FreezeRule(match="decoder.layerz.*")),
     r"^freeze.rules\[1\].match='decoder.layerz.\*' matches no parameter$"),
    (rules_cfg(FreezeRule(match="group:berts")), r"freeze.rules\[0\].match='group:berts': unknown parameter group 'berts'"),
    (rules_cfg(FreezeRule(match="group:bert.layer.-3")), r"the pretrained encoder has 2 layers"),
    (rules_cfg(FreezeRule(match="group:bert", end=4), FreezeRule(match="group:bert.layer.-1", frozen=False, start=3)),
     r"freeze.rules\[0\].*and freeze.rules\[1\].*contradict each other on bert.model.encoder.layer.1"),
    (rules_cfg(FreezeRule(match="re:^embed_tokens", frozen=False, start=2), policy="nmt_frozen"),
     r"^freeze.policy='nmt_frozen' \(group:embeddings frozen \[1, inf\)\) and freeze.rules\[0\] \(re:\^embed_tokens "
     r"trains \[2, inf\)\) contradict each other on embed_tokens.weight$"),
])
def test_config_errors_against_the_model(bert_path: str, cfg: FreezeConfig, message: str) -> None:
    policy = FreezePolicy(cfg)
    with pytest.raises(ConfigError, match=message):
        policy.bind(fused_model(bert_path))


def test_nmt_frozen_needs_a_fused_model_and_presets_skip_a_missing_encoder() -> None:
    plain = BertFusedTransformer(ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=1, dec_layers=1, fused=False), 50, 0, None)
    with pytest.raises(ConfigError, match=r"freeze.policy='nmt_frozen' \(group:fusion\) matches no parameter"):
        FreezePolicy(FreezeConfig(policy="nmt_frozen")).bind(plain)
    policy = FreezePolicy(FreezeConfig(policy="unfreeze_after", unfreeze_at=2))
    policy.apply(plain)
    assert all(p.requires_grad for p in plain.parameters())


# -- the Trainer: per-epoch reports, switch logging, checkpoints and exact resume -------------------
def fake_data(n: int = 24) -> PreparedData:
    return shared_fake_data(n, max_len=8)


def trainer_cfg(freeze: FreezeConfig, epochs: int) -> Config:
    return Config(model=TINY, freeze=freeze, optim=OptimConfig(lr=1e-3, warmup_steps=3),
                  data=DataConfig(max_tokens=100),
                  trainer=TrainerConfig(max_epochs=epochs, device="cpu", valid_bleu=False, tensorboard=False, progress=False))


def make_trainer(bert_path: str, freeze: FreezeConfig, epochs: int, run_dir: Path, resume: Path | None = None) -> Trainer:
    torch.manual_seed(123)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(trainer_cfg(freeze, epochs), fused_model(bert_path), fake_data(), FreezePolicy(freeze), run_dir,
                   "fused", {}, enc_pad_id=0, resume=resume)


def test_trainer_reports_each_epoch_and_logs_the_switch(bert_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bertnmt.train.trainer")
    trainer = make_trainer(bert_path, FreezeConfig(policy="unfreeze_after", unfreeze_at=2), 2, tmp_path)
    pretrained = bert_snapshot(fused_model(bert_path))
    trainer.fit()
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    bert = [r["params_by_group"]["bert"] for r in recs]
    assert [b["trainable"] for b in bert] == [0, bert[0]["total"]]
    assert set(recs[0]["params_by_group"]) == {"bert", "fusion", "encoder", "decoder", "embeddings"}
    assert recs[0]["active_rules"] == ["freeze.policy='unfreeze_after': group:bert frozen [1, 2)"]
    assert recs[1]["active_rules"] == ["freeze.policy='unfreeze_after': group:bert trains [2, inf) lr x1"]
    lrs = {n: g["lr"] for g in trainer.optimizer.param_groups for n in g["names"]}  # inverse sqrt x multiplier (1 here)
    assert lrs["bert.model.encoder.layer.0.output.dense.weight"] == lrs["encoder.layers.0.ffn.fc1.weight"] > 0
    switches = [m for m in caplog.messages if "freeze switch" in m]
    assert len(switches) == 1 and "epoch 2" in switches[0] and "bert 0/" not in switches[0]
    assert sum("epoch 1 step 0 |" in m and "bert 0/" in m for m in caplog.messages) == 1
    ckpt = torch.load(tmp_path / "checkpoints" / "fused" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["freeze"]["epoch"] == 2 and ckpt["freeze"]["step"] == trainer.step and ckpt["freeze"]["policy"] == "unfreeze_after"
    assert any(k.startswith("bert.") for k in ckpt["model"])  # it trains, so it is stored
    assert not torch.equal(ckpt["model"]["bert.model.embeddings.word_embeddings.weight"],
                           pretrained["model.embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("freeze", [
    FreezeConfig(policy="unfreeze_after", unfreeze_at=3, warmup=2, bert_lr_mult=0.5),  # the switch comes after the resume
    FreezeConfig(policy="unfreeze_after", unit="step", unfreeze_at=7, warmup=3),  # mid-epoch switch, step unit
], ids=["epoch", "step"])
def test_resume_mid_schedule_is_exact(bert_path: str, tmp_path: Path, freeze: FreezeConfig,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bertnmt.train.trainer")
    straight = make_trainer(bert_path, freeze, 4, tmp_path / "a")
    straight.fit()
    switch = "epoch 3 step 6 | freeze switch" if freeze.unit == "epoch" else "epoch 3 step 7 | freeze switch"
    assert [m for m in caplog.messages if "freeze switch" in m] == [m for m in caplog.messages if switch in m] != []
    first = make_trainer(bert_path, freeze, 2, tmp_path / "b")
    first.fit()
    assert first.step < 7 < straight.step
    ckpt = tmp_path / "b" / "checkpoints" / "fused" / "checkpoint_last.pt"
    resumed = make_trainer(bert_path, freeze, 4, tmp_path / "b", resume=ckpt)
    assert (resumed.start_epoch, resumed.step, resumed.policy.epoch) == (3, first.step, 2)
    resumed.fit()
    assert resumed.step == straight.step
    ours, theirs = dict(resumed.model.named_parameters()), dict(straight.model.named_parameters())
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    assert not torch.equal(theirs["bert.model.encoder.layer.0.output.dense.weight"],
                           dict(fused_model(bert_path).named_parameters())["bert.model.encoder.layer.0.output.dense.weight"])


def test_dry_run_prints_the_table_without_data(bert_path: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "scripts/train.py", "+exp=unfreeze_bert", "freeze.dry_run=true", "model=tiny",
           f"bert.path={bert_path}", "trainer.max_epochs=3", f"data.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    bert = [r[2] for r in rows]
    assert bert[0].split("/")[0] == "0" and bert[1].split("/")[0] == bert[1].split("/")[1]
    assert "group:bert frozen" in out.stdout and "group:bert lr x0.1" in out.stdout
    assert not (tmp_path / "cache").exists()


def test_a_bad_rule_fails_before_any_data(bert_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bertnmt.recipe.pipeline as pipeline

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the freeze config was checked")

    monkeypatch.setattr(pipeline, "prepare_data", no_data)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=[
            "model=tiny", f"bert.path={bert_path}", "freeze=rules", "freeze.rules=[{match: 'decoder.layerz.*'}]"]))
    cfg.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"freeze.rules\[0\].match='decoder.layerz.\*' matches no parameter"):
        pipeline.run(cfg)
