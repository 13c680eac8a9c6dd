"""The policy engine on any nn.Module: the classic toy net (fc1..fc5, Linear 10-3-3-3-3-1) with fc2
frozen for epochs 1-3 of 10: 61 trainable parameters, then 73 from epoch 4; fc2 unchanged through
epoch 3 and changed at epoch 4."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from bertnmt.core.config import FreezeConfig, FreezeRule, OptimConfig, register_configs, to_config
from bertnmt.train.freeze import FreezePolicy, schedule_table

ROOT = Path(__file__).resolve().parents[2]
register_configs()


class Toy(nn.Module):
    """Linear 10-3-3-3-3-1 with ReLUs: 33 + 12 + 12 + 12 + 4 = 73 parameters, fc2 holds 12."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.fc4, self.fc5 = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 10) -> (B, 1)
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = F.relu(fc(x))
        return self.fc5(x)


TOY_RULES = FreezeConfig(policy="rules", unit="epoch", rules=[FreezeRule(match="fc2.*", frozen=True, start=1, end=4)])


def train_toy(policy: FreezePolicy, model: nn.Module, epochs: int = 10,
              steps: int = 4) -> tuple[list[int], list[torch.Tensor]]:
    """A generic loop: apply the policy each epoch, AdamW over policy.param_groups, lr scaled by the policy."""
    opt = torch.optim.AdamW(policy.param_groups(model, OptimConfig(lr=1e-2)), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 10, generator=g), torch.randn(16, 1, generator=g)  # (B, 10), (B, 1)
    counts, fc2 = [], [model.fc2.weight.detach().clone()]
    for epoch in range(1, epochs + 1):
        model.train()
        policy.apply(model, epoch=epoch)
        counts.append(policy.report(model)["trainable_params"])
        for _ in range(steps):
            F.mse_loss(model(x), y).backward()
            policy.scale_lrs(opt, [1e-2] * len(opt.param_groups))
            opt.step()
            opt.zero_grad(set_to_none=True)
        fc2.append(model.fc2.weight.detach().clone())  # fc2[e] = after epoch e
    return counts, fc2


def check_toy(counts: list[int], fc2: list[torch.Tensor]) -> None:
    assert counts == [61, 61, 61] + [73] * 7
    for epoch in (1, 2, 3):
        assert torch.equal(fc2[epoch], fc2[0]), f"fc2 moved in epoch {epoch}"
    assert not torch.equal(fc2[4], fc2[3]), "fc2 must train from epoch 4"


def test_toy_net_61_then_73_and_fc2_fixed_through_epoch_3() -> None:
    torch.manual_seed(0)
    model = Toy()
    assert sum(p.numel() for p in model.parameters()) == 73
    fc1_before = model.fc1.weight.detach().clone()
    counts, fc2 = train_toy(FreezePolicy(TOY_RULES), model)
    check_toy(counts, fc2)
    assert not torch.equal(model.fc1.weight, fc1_before)


def test_toy_net_through_hydra() -> None:
    """docs/freezing.md's config: freeze=rules with one rule, from the command line."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=[
            "freeze=rules", "freeze.rules=[{match: 'fc2.*', frozen: true, start: 1, end: 4}]"]))
    torch.manual_seed(0)
    check_toy(*train_toy(FreezePolicy(cfg.freeze), Toy()))


def test_toy_dry_run_table_is_in_the_docs() -> None:
    table = schedule_table(FreezePolicy(TOY_RULES), Toy(), epochs=10)
    lines = table.splitlines()
    assert lines[1].split()[:7] == ["epoch", "trainable/total", "fc1", "fc2", "fc3", "fc4", "fc5"]
    assert lines[2].split()[:4] == ["1", "61/73", "33/33", "0/12"] and lines[2].endswith("fc2.* frozen")
    assert lines[5].split() == ["4", "73/73", "33/33", "12/12", "12/12", "12/12", "4/4", "-"]
    doc = (ROOT / "docs" / "freezing.md").read_text(encoding="utf-8")
    assert table in doc, "docs/freezing.md's toy table is stale:\n" + table


def test_step_windows_are_zero_based_optimizer_updates() -> None:
    torch.manual_seed(0)
    model = Toy()
    policy = FreezePolicy(FreezeConfig(policy="rules", unit="step", rules=[FreezeRule(match="re:^fc2\\.", end=2)]))
    opt = torch.optim.AdamW(policy.param_groups(model, OptimConfig()), lr=1e-2)
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    history = []
    for step in range(4):
        policy.apply(model, step=step)
        before = model.fc2.weight.detach().clone()
        F.mse_loss(model(x), y).backward()
        policy.scale_lrs(opt, [1e-2] * len(opt.param_groups))
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(torch.equal(before, model.fc2.weight))
    assert history == [True, True, False, False]  # frozen in updates 0 and 1, trains from update 2


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_fully_frozen_submodules_stay_in_eval_mode_through_train() -> None:
    model = WithDropout()
    policy = FreezePolicy(FreezeConfig(policy="rules", rules=[FreezeRule(match="group:block", end=3)]))
    model.train()
    policy.apply(model, epoch=1)
    assert not model.block.training and not model.block[1].training and model.head.training
    x = torch.randn(5, 4)
    assert torch.equal(model(x), model(x)), "dropout in a frozen block must be off"
    model.train()  # a parent's train() recurses ...
    policy.apply(model, epoch=2)  # ... and the policy re-locks
    assert not model.block[1].training
    policy.apply(model, epoch=3)  # unfrozen: back to train mode
    assert model.block.training and model.block[1].training
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("rules", [
    [FreezeRule(match="fc2.*", frozen=True), FreezeRule(match="fc2.weight", frozen=False, start=2)],
])
def test_contradicting_rules_on_a_generic_module(rules: list[FreezeRule]) -> None:
    from bertnmt.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"freeze.rules\[0\].*freeze.rules\[1\].*contradict each other on fc2.weight"):
        FreezePolicy(FreezeConfig(policy="rules", rules=rules)).bind(Toy())
