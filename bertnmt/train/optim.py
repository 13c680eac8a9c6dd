"""The optimizer of a training stage: AdamW over the freeze policy's parameter classes, its state by name.

:meth:`bertnmt.train.freeze.FreezePolicy.param_groups` puts every parameter in one group per class of
parameters that are trainable and share a learning-rate multiplier at every position (the same freeze
rules match them), so the optimizer runs a handful of groups instead of one per tensor. AdamW is
``fused=True`` where torch has the fused kernel (CUDA and the CPU): one kernel a group, and a
non-finite update is skipped on the device through its ``found_inf`` flag (see
:meth:`bertnmt.train.trainer.Trainer._update`), with no host sync.

Because the groups depend on the policy, checkpoints store the optimizer's state keyed by parameter
*name* (:func:`optimizer_state`); :func:`load_optimizer_state` maps it onto the current groups,
so a stage resumes exactly under the same policy, across a freeze switch, and under another policy.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bertnmt.core.config import OptimConfig
from bertnmt.core.errors import CheckpointError

FORMAT = "by_name"
_FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(policy: Any, model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``policy.param_groups(model, optim)``; fused on CUDA and the CPU, foreach elsewhere."""
    groups = policy.param_groups(model, optim)
    impl = {"fused": True} if device.type in _FUSED_DEVICES else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, **impl)


def _names(optimizer: torch.optim.Optimizer) -> list[str]:
    """Every parameter's name, in the order of ``optimizer.state_dict()``'s integer ids."""
    names: list[str] = []
    for g in optimizer.param_groups:
        if "names" not in g or len(g["names"]) != len(g["params"]):
            raise ValueError("the optimizer's groups must carry their parameters' names (FreezePolicy.param_groups)")
        names += g["names"]
    return names


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name (plain dicts of tensors: ``weights_only``-safe)."""
    sd = optimizer.state_dict()
    names = _names(optimizer)
    return {"format": FORMAT, "state": {names[i]: s for i, s in sd["state"].items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: str = "") -> None:
    """Restore :func:`optimizer_state` into ``optimizer`` (any grouping); the groups' own settings are kept.

    Also reads the older layout of one group per tensor with its ``name`` (torch's own state dict).
    A parameter without saved state (it never trained) starts without state, as it would have."""
    if saved.get("format") == FORMAT:
        by_name = saved["state"]
    elif "param_groups" in saved and all("name" in g and len(g["params"]) == 1 for g in saved["param_groups"]):
        by_name = {g["name"]: saved["state"][g["params"][0]] for g in saved["param_groups"]
                   if g["params"][0] in saved["state"]}
    else:
        raise CheckpointError(f"checkpoint {source}: the optimizer state has no parameter names; it cannot be resumed")
    names = _names(optimizer)
    unknown = sorted(set(by_name) - set(names))
    if unknown:
        raise CheckpointError(f"checkpoint {source}: optimizer state for parameters the model lacks: {unknown[:3]}")
    sd = optimizer.state_dict()
    sd["state"] = {i: by_name[n] for i, n in enumerate(names) if n in by_name}
    optimizer.load_state_dict(sd)
