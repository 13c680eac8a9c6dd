"""The freeze policy: the one place that decides what trains, and when.

:class:`FreezePolicy` compiles ``cfg.freeze`` (a preset or a list of rules, see
:mod:`bertnmt.train.freeze_rules`) and, at each position of training (epoch, step), alone sets:

- ``requires_grad`` of every parameter (a newly frozen one also loses its ``.grad``);
- the pretrained encoder's eval-mode lock and ``no_grad`` forward (:meth:`PretrainedEncoder.set_frozen`),
  and eval mode for every other fully frozen submodule, re-applied after ``model.train()``;
- the per-parameter learning-rate multipliers (incl. the warm-up after an unfreeze).

The optimizer gets one parameter group per class of parameters that the same rules match (so
trainable together, with one lr multiplier, at every position), always all parameters; its state
is saved by parameter name (:mod:`bertnmt.train.optim`), so a stage resumes under another policy too.
Frozen parameters keep ``grad=None`` and AdamW skips them entirely, weight decay and momentum
included. Works on any ``nn.Module``; the report groups of :class:`BertFusedTransformer`
are bert, fusion, encoder, decoder and embeddings, and any other module's are its top-level children.
:meth:`FreezePolicy.apply` returns True at a switch: a DDP wrapper, which ignores ``requires_grad``
changes made after wrapping, must be rebuilt then.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Iterable, Optional

from torch import nn

from bertnmt.core.config import FreezeConfig, OptimConfig
from bertnmt.core.errors import ConfigError
from bertnmt.train.freeze_rules import GROUPS, POLICIES, NameIndex, Rule, check_config, first_position, param_group, preset_rules

__all__ = ["FreezePolicy", "GROUPS", "POLICIES", "param_group", "schedule_table"]

log = logging.getLogger(__name__)


class FreezePolicy:
    """What trains at each (epoch, step). ``FreezePolicy(cfg)`` checks the config without a model;
    :meth:`bind` (called by :meth:`apply` when needed) checks it against a model's parameter names."""

    def __init__(self, cfg: FreezeConfig) -> None:
        self.cfg = cfg
        self.user_rules = check_config(cfg)  # ConfigError on syntax, windows, values
        self.epoch, self.step = 1, 0  # the position: the current epoch (1-based) and optimizer update (0-based)
        self.rules: list[Rule] = []  # compiled, bound to the model's names
        self._model: Optional[weakref.ref] = None  # the bound model (a weak reference: ids get reused)
        self._params: dict[str, nn.Parameter] = {}
        self._matches: dict[str, list[int]] = {}  # parameter name -> indexes of the rules matching it
        self._key: Any = None  # the state last applied
        self._trainable: dict[str, bool] = {}
        self._mult: dict[str, float] = {}
        self._locked: list[nn.Module] = []  # fully frozen submodules held in eval mode

    # -- position and binding ----------------------------------------------------------------------
    @property
    def unit(self) -> str:
        return self.cfg.unit

    @property
    def position(self) -> int:
        """Where the schedule is, in its own unit."""
        return self.epoch if self.unit == "epoch" else self.step

    def bind(self, model: nn.Module) -> "FreezePolicy":
        """Compile the rules against ``model``'s parameter names; every name-dependent check happens here:
        a rule that matches no parameter, an unknown group or layer, two rules that contradict each other."""
        params = dict(model.named_parameters())
        index = NameIndex(list(params))
        if self.cfg.policy == "gradual" and index.layer and not index.n_layers:
            raise ConfigError("freeze.policy='gradual': cannot find the layers of the pretrained encoder")
        rules, matches = [], {n: [] for n in params}
        for rule in preset_rules(self.cfg, index.n_layers) + self.user_rules:
            names = index.select(rule)
            if not names:
                if rule.required:
                    raise ConfigError(f"{rule.key()} matches no parameter")
                continue  # a preset's rule over a group this model lacks (no pretrained encoder)
            for n in names:
                matches[n].append(len(rules))
            rules.append(rule)
        for n, idx in matches.items():  # contradictions: overlapping windows, different `frozen`
            for a in range(len(idx)):
                for b in range(a + 1, len(idx)):
                    r, s = rules[idx[a]], rules[idx[b]]
                    if r.frozen != s.frozen and r.overlaps(s):
                        raise ConfigError(f"{r.brief()} and {s.brief()} contradict each other on {n}")
        self.rules, self._matches, self._params = rules, matches, params
        self._model, self._key, self._trainable, self._mult, self._locked = weakref.ref(model), None, {}, {}, []
        return self

    def _bound(self, model: nn.Module) -> None:
        if self._model is None or self._model() is not model:
            self.bind(model)

    def state_at(self, pos: int) -> tuple[dict[str, bool], dict[str, float]]:
        """(trainable, lr multiplier) of every parameter at ``pos``; the last active trainable rule sets the multiplier."""
        active = [r.active(pos) for r in self.rules]
        trainable, mult = {}, {}
        for n, idx in self._matches.items():
            frozen, m = False, 1.0
            for i in idx:
                if active[i]:
                    if self.rules[i].frozen:
                        frozen = True
                    else:
                        m = self.rules[i].mult(pos)
            trainable[n], mult[n] = not frozen, 0.0 if frozen else m
        return trainable, mult

    def boundaries(self) -> list[int]:
        """The positions where the state can switch: the first one and every window edge."""
        first = first_position(self.unit)
        edges = {first} | {p for r in self.rules for p in (r.start, r.end) if p is not None and p >= first}
        return sorted(edges)

    # -- applying ----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, epoch: Optional[int] = None, step: Optional[int] = None) -> bool:
        """Move to (epoch, step) and enforce the state there; True when the trainable set changed.

        Cheap when nothing changed, so the trainer calls it at each epoch start, after every
        ``model.train()`` (it re-locks eval mode) and, for ``unit=step``, before every update.
        """
        if epoch is not None:
            self.epoch = epoch
        if step is not None:
            self.step = step
        self._bound(model)
        pos = self.position
        key = tuple((r.active(pos), r.mult(pos)) for r in self.rules)
        changed = False
        if key != self._key:
            trainable, mult = self.state_at(pos)
            changed = trainable != self._trainable
            self._key, self._trainable, self._mult = key, trainable, mult
            if changed:
                self._set_trainable(model)
        if model.training:
            for m in self._locked:
                m.eval()
        return changed

    def _set_trainable(self, model: nn.Module) -> None:
        bert = getattr(model, "bert", None)
        if bert is not None and hasattr(bert, "set_frozen"):  # eval lock + no_grad when wholly frozen
            bert.set_frozen(not any(self._trainable[n] for n in self._params if n.startswith("bert.")))
        for n, p in self._params.items():
            p.requires_grad_(self._trainable[n])
            if not self._trainable[n]:
                p.grad = None  # a frozen parameter never carries a gradient
        for m in self._locked:  # release the previous locks, then lock the maximal fully frozen submodules
            m.train(model.training)
        self._locked, prefixes = [], []
        for name, m in model.named_modules():  # pre-order: a parent comes before its children
            if not name or any(name.startswith(p) for p in prefixes):
                continue
            ps = list(m.parameters())
            if ps and not any(p.requires_grad for p in ps):
                prefixes.append(name + ".")
                if not hasattr(m, "set_frozen"):  # a PretrainedEncoder locks itself
                    self._locked.append(m)

    # -- optimizer ---------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict]:
        """Every parameter, one group per class of parameters matched by the same freeze rules (so trainable
        together and with the same lr multiplier at every position), in ``named_parameters()`` order.

        Each group has its parameters' "names", a "name" (its first parameter's) and the base lr (a
        scheduler's base): :meth:`scale_lrs` applies the multipliers before each step. A frozen class keeps
        ``grad=None`` and AdamW skips it. The grouping depends on the policy: checkpoints keep the
        optimizer's state by parameter name (:mod:`bertnmt.train.optim`)."""
        self._bound(model)
        classes: dict[tuple[int, ...], list[str]] = {}
        for n in self._params:
            classes.setdefault(tuple(self._matches[n]), []).append(n)
        return [{"params": [self._params[n] for n in names], "names": names, "name": names[0], "lr": optim.lr,
                 "weight_decay": optim.weight_decay} for names in classes.values()]

    def lr_mult(self, name: str) -> float:
        """The current learning-rate multiplier of a parameter (0 while frozen)."""
        return self._mult.get(name, 1.0)

    def scale_lrs(self, optimizer: Any, base_lrs: list[float]) -> None:
        """Set each group's lr to the schedule's base lr times its parameters' multiplier (before ``step()``).
        A group of one class shares its multiplier; a group without "names" uses its "name"."""
        for group, base in zip(optimizer.param_groups, base_lrs):
            names = group.get("names") or [group.get("name", "")]
            group["lr"] = base * self._mult.get(names[0], 1.0)

    # -- reporting ---------------------------------------------------------------------------------
    def active_rules(self, pos: Optional[int] = None) -> list[str]:
        pos = self.position if pos is None else pos
        return [r.describe(pos) for r in self.rules if r.active(pos)]

    def report(self, model: nn.Module) -> dict:
        """Trainable / total parameter counts, in all and per group, and the active rules."""
        by_group: dict[str, dict[str, int]] = {}
        for name, p in model.named_parameters():
            g = by_group.setdefault(param_group(name), {"trainable": 0, "total": 0})
            g["total"] += p.numel()
            if p.requires_grad:
                g["trainable"] += p.numel()
        by_group = {g: by_group[g] for g in ordered_groups(by_group)}
        return {
            "policy": self.cfg.policy,
            "trainable_params": sum(g["trainable"] for g in by_group.values()),
            "total_params": sum(g["total"] for g in by_group.values()),
            "params_by_group": by_group,
            "active_rules": self.active_rules(),
        }

    def may_train(self, model: nn.Module, prefix: str) -> bool:
        """Whether any parameter whose name starts with ``prefix`` trains at any position."""
        self._bound(model)
        names = [n for n in self._params if n.startswith(prefix)]
        return any(self.state_at(pos)[0][n] for pos in self.boundaries() for n in names)

    def encoder_untrained(self, model: nn.Module) -> bool:
        """True while every parameter of the pretrained encoder (``bert.*``) has been frozen at every
        position up to now: its outputs are those of the loaded weights, so cached features are valid.
        False from the first position where any part of it trains, for the rest of the run."""
        self._bound(model)
        names = [n for n in self._params if n.startswith("bert.")]
        if not names:
            return False
        now = self.position
        positions = [p for p in self.boundaries() if p <= now] + [now]
        return not any(self.state_at(pos)[0][n] for pos in positions for n in names)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The policy and its position (only str/int/list: loadable with ``weights_only=True``)."""
        return {"policy": self.cfg.policy, "unit": self.unit, "epoch": self.epoch, "step": self.step,
                "rules": [r.describe() for r in self.rules]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; resuming under another policy is allowed (the optimizer's state is kept by name)."""
        self.epoch, self.step = int(state.get("epoch", 1)), int(state.get("step", 0))
        self._key = None
        theirs = (state.get("policy"), state.get("unit"), state.get("rules"))
        ours = (self.cfg.policy, self.unit, [r.describe() for r in self.rules] if self.rules else theirs[2])
        if theirs != ours:
            log.warning("resuming under another freeze policy: checkpoint %s/%s, now %s/%s",
                        theirs[0], theirs[1], ours[0], ours[1])


def ordered_groups(groups: Iterable[str]) -> list[str]:
    """Distinct group names: bert, fusion, encoder, decoder, embeddings first, then the others as they come."""
    seen = list(dict.fromkeys(groups))
    return [g for g in GROUPS if g in seen] + [g for g in seen if g not in GROUPS]


def schedule_table(policy: FreezePolicy, model: nn.Module, epochs: int, max_steps: int = 0) -> str:
    """What trains at each epoch (``unit=epoch``) or from each switch step (``unit=step``), with counts.

    Computed from the rules alone: ``model`` is not changed and nothing trains (the dry run).
    """
    policy._bound(model)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    groups = ordered_groups(param_group(n) for n in numel)
    if policy.unit == "epoch":
        positions = list(range(1, epochs + 1))
    else:
        positions = [p for p in policy.boundaries() if not max_steps or p < max_steps]
    header = [policy.unit if policy.unit == "epoch" else "from step", "trainable/total", *groups, "active rules"]
    rows = []
    for pos in positions:
        trainable, _ = policy.state_at(pos)
        cells = []
        for sel in [None, *groups]:
            names = [n for n in numel if sel is None or param_group(n) == sel]
            cells.append(f"{sum(numel[n] for n in names if trainable[n]):,}/{sum(numel[n] for n in names):,}")
        rules = "; ".join(r.short(pos) for r in policy.rules if r.active(pos)) or "-"
        rows.append([str(pos), *cells, rules])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    title = (f"freeze policy {policy.cfg.policy!r}, unit {policy.unit} "
             "(windows [start, end): epochs 1-based, steps 0-based optimizer updates)")
    return "\n".join([title, fmt(header), *map(fmt, rows)])
