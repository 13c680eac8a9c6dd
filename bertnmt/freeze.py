"""The freeze policy: the one place that decides what trains.

It alone sets ``requires_grad``, locks the pretrained encoder in eval mode with
``no_grad`` (through :meth:`PretrainedEncoder.set_frozen`), and builds the optimizer's
parameter groups. The groups always hold *every* parameter, so a later unfreeze needs
no new optimizer (design pitfall 1); frozen parameters get ``grad=None`` and the
optimizer skips them entirely, weight decay included (pitfall 2).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bertnmt.config import FreezeConfig, OptimConfig
from bertnmt.errors import ConfigError

POLICIES = ("frozen", "finetune")
GROUPS = ("bert", "fusion", "encoder", "decoder", "embeddings")


def param_group(name: str) -> str:
    """The report group of a parameter of :class:`BertFusedTransformer`."""
    if name.startswith("bert."):
        return "bert"
    if ".bert_attn." in name:
        return "fusion"
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith("decoder."):
        return "decoder"
    return "embeddings"


@dataclass
class FreezePolicy:
    cfg: FreezeConfig

    def __post_init__(self) -> None:
        if self.cfg.policy not in POLICIES:
            raise ConfigError(f"freeze.policy={self.cfg.policy!r} is not one of {', '.join(POLICIES)}")

    @property
    def bert_trainable(self) -> bool:
        return self.cfg.policy == "finetune"

    def apply(self, model: nn.Module) -> None:
        """Set requires_grad / eval lock for the current position of the policy."""
        bert = getattr(model, "bert", None)
        if bert is not None:
            bert.set_frozen(not self.bert_trainable)

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        """All parameters, in named groups with their learning-rate multipliers."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            groups.setdefault(param_group(name), []).append(p)
        out = []
        for g in GROUPS:
            if g not in groups:
                continue
            mult = self.cfg.bert_lr_mult if g == "bert" else 1.0
            out.append({"params": groups[g], "name": g, "lr_mult": mult, "lr": optim.lr * mult})
        return out

    def report(self, model: nn.Module) -> dict:
        """Trainable / total parameter counts, in all and per group."""
        by_group: dict[str, dict[str, int]] = {}
        for name, p in model.named_parameters():
            g = by_group.setdefault(param_group(name), {"trainable": 0, "total": 0})
            g["total"] += p.numel()
            if p.requires_grad:
                g["trainable"] += p.numel()
        return {
            "policy": self.cfg.policy,
            "trainable_params": sum(g["trainable"] for g in by_group.values()),
            "total_params": sum(g["total"] for g in by_group.values()),
            "params_by_group": by_group,
        }

    def state_dict(self) -> dict:
        return {"policy": self.cfg.policy}
