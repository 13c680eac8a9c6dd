"""Freeze rules for :mod:`bertnmt.train.freeze`: parameter groups, name matching, windows, presets.

A rule selects parameters by name and holds over a window [start, end) of the policy's unit
(epochs are 1-based, steps are 0-based optimizer updates; ``None`` = open). Inside its window a
rule either freezes its parameters or lets them train with a learning-rate multiplier, ramped
linearly over its first ``warmup`` units. Every preset compiles into this one form.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Optional

from bertnmt.core.config import FreezeConfig, FreezeRule
from bertnmt.core.errors import ConfigError

POLICIES = ("frozen", "finetune", "unfreeze_after", "gradual", "nmt_frozen", "rules")
UNITS = ("epoch", "step")
GROUPS = ("bert", "fusion", "encoder", "decoder", "embeddings")
EMBEDDINGS = ("embed_tokens.", "decoder_embed_tokens.", "output_projection.")
# The NMT modules a plain Transformer lacks: BERT attention, the stacked variant's LayerNorm, the learned
# layer mix and the feature-based input projection (paper sections 4 and 6; bertnmt/model/).
FUSION_MODULES = frozenset({"bert_attn", "bert_attn_ln", "bert_mix", "bert_proj"})
_BERT_LAYER = re.compile(r"\.(?:layer|layers|block|blocks|h)\.(\d+)\.")  # HF block lists
_GROUP_SYNTAX = re.compile(r"bert\.layer\.-?\d+|bert\.embeddings|[A-Za-z_]\w*")


def param_group(name: str) -> str:
    """The report group of a parameter.

    :class:`BertFusedTransformer`: ``bert`` (the pretrained encoder), ``fusion`` (the modules in
    :data:`FUSION_MODULES`: ``*.bert_attn.*``, ``*.bert_attn_ln.*``, ``bert_mix.*``, ``bert_proj.*``),
    ``encoder``, ``decoder``, ``embeddings``. Any other module: the parameter's top-level child.
    """
    if name.startswith("bert."):
        return "bert"
    if not FUSION_MODULES.isdisjoint(name.split(".")[:-1]):
        return "fusion"
    if name.startswith(EMBEDDINGS):
        return "embeddings"
    return name.split(".", 1)[0]


def bert_layer(name: str) -> Optional[int]:
    """The block index of a ``bert.*`` parameter (``bert.model.encoder.layer.3.…`` -> 3), else None."""
    m = _BERT_LAYER.search(name) if name.startswith("bert.") else None
    return int(m.group(1)) if m else None


def first_position(unit: str) -> int:
    """Epochs count from 1, steps (optimizer updates) from 0."""
    return 1 if unit == "epoch" else 0


@dataclass(frozen=True)
class Rule:
    """A compiled rule: a :class:`FreezeRule` plus where it came from."""

    label: str  # "freeze.rules[2]" (a user rule) or "freeze.policy='gradual'" (a preset's)
    match: str
    frozen: bool
    start: Optional[int]
    end: Optional[int]
    lr_mult: float
    warmup: int
    first: int  # the first position of the unit
    required: bool = True  # False: a preset rule over a group this model lacks is dropped

    @property
    def lo(self) -> int:
        return self.first if self.start is None else self.start

    @property
    def hi(self) -> float:
        return math.inf if self.end is None else self.end

    def active(self, pos: int) -> bool:
        return self.lo <= pos < self.hi

    def mult(self, pos: int) -> float:
        """The lr multiplier at ``pos`` (0 while frozen): ``lr_mult * min(1, k / warmup)``, k = 1, 2, ..."""
        if self.frozen:
            return 0.0
        if self.warmup <= 0:
            return self.lr_mult
        return self.lr_mult * min(1.0, (pos - self.lo + 1) / self.warmup)

    def window(self) -> str:
        return f"[{self.lo}, {'inf' if self.end is None else self.end})"

    def key(self) -> str:
        """How an error message names this rule."""
        if self.label.startswith("freeze.rules["):
            return f"{self.label}.match={self.match!r}"
        return f"{self.label} ({self.match})"

    def brief(self) -> str:
        """E.g. ``freeze.rules[1] (fc2.weight trains [2, inf))`` (for error messages)."""
        return f"{self.label} ({self.match} {'frozen' if self.frozen else 'trains'} {self.window()})"

    def describe(self, pos: Optional[int] = None) -> str:
        """E.g. ``freeze.rules[0]: fc2.* frozen [1, 4)``; with ``pos``, the multiplier there."""
        what = "frozen" if self.frozen else "trains"
        text = f"{self.label}: {self.match} {what} {self.window()}"
        if not self.frozen:
            mult = self.lr_mult if pos is None else self.mult(pos)
            text += f" lr x{mult:.3g}" + (f" (warm-up {self.warmup})" if self.warmup else "")
        return text

    def short(self, pos: int) -> str:
        """E.g. ``fc2.* frozen`` or ``group:bert lr x0.5`` (for the dry-run table)."""
        return f"{self.match} {'frozen' if self.frozen else f'lr x{self.mult(pos):.3g}'}"

    def overlaps(self, other: "Rule") -> bool:
        return max(self.lo, other.lo) < min(self.hi, other.hi)


def check_match(match: str, key: str) -> None:
    """Syntax of a ``match`` (the model-dependent checks happen in :meth:`NameIndex.select`)."""
    if not isinstance(match, str) or not match.strip():
        raise ConfigError(f"{key} is empty")
    if match.startswith("re:"):
        try:
            re.compile(match[3:])
        except re.error as e:
            raise ConfigError(f"{key}={match!r} is not a valid regular expression ({e})") from None
    elif match.startswith("group:") and not _GROUP_SYNTAX.fullmatch(match[6:]):
        raise ConfigError(f"{key}={match!r}: unknown parameter group {match[6:]!r} ({known_groups()})")


def known_groups(extra: tuple[str, ...] = ()) -> str:
    names = [*GROUPS, "bert.embeddings", "bert.layer.K", *sorted(set(extra) - set(GROUPS))]
    return "known: " + ", ".join(names)


def check_window(start: Optional[int], end: Optional[int], unit: str, key: str) -> None:
    """Positions exist (epochs >= 1, steps >= 0) and the window [start, end) is not empty."""
    first = first_position(unit)
    for name, v in (("start", start), ("end", end)):
        if v is not None and v < first:
            raise ConfigError(f"{key}.{name}={v} is before the first {unit} ({first}; windows are [start, end), "
                              "epochs 1-based, steps 0-based)")
    lo = first if start is None else start
    if end is not None and end <= lo:
        raise ConfigError(f"{key}: window [{lo}, {end}) is empty: its end must be after its start")


def user_rule(r: FreezeRule, i: int, unit: str) -> Rule:
    """Check and compile ``freeze.rules[i]``."""
    label = f"freeze.rules[{i}]"
    check_match(r.match, f"{label}.match")
    check_window(r.start, r.end, unit, label)
    if r.lr_mult < 0:
        raise ConfigError(f"{label}.lr_mult={r.lr_mult} must not be negative")
    if r.warmup < 0:
        raise ConfigError(f"{label}.warmup={r.warmup} must not be negative")
    return Rule(label, r.match, bool(r.frozen), r.start, r.end, float(r.lr_mult), int(r.warmup), first_position(unit))


def check_config(cfg: FreezeConfig) -> list[Rule]:
    """Everything checkable without a model; returns the compiled user rules."""
    if cfg.policy not in POLICIES:
        raise ConfigError(f"freeze.policy={cfg.policy!r} is not one of {', '.join(POLICIES)}")
    if cfg.unit not in UNITS:
        raise ConfigError(f"freeze.unit={cfg.unit!r} is not one of {', '.join(UNITS)}")
    first = first_position(cfg.unit)
    for key in ("bert_lr_mult", "warmup"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"freeze.{key}={getattr(cfg, key)} must not be negative")
    if cfg.every < 1:
        raise ConfigError(f"freeze.every={cfg.every} must be at least 1")
    if cfg.policy == "unfreeze_after" and cfg.unfreeze_at is None:
        raise ConfigError("freeze.unfreeze_at=null: policy unfreeze_after needs the epoch or step to unfreeze at")
    if cfg.unfreeze_at is not None and cfg.unfreeze_at < first:
        raise ConfigError(f"freeze.unfreeze_at={cfg.unfreeze_at} is before the first {cfg.unit} ({first})")
    if cfg.until is not None:
        check_window(None, cfg.until, cfg.unit, "freeze.until")
    return [user_rule(r, i, cfg.unit) for i, r in enumerate(cfg.rules)]


def preset_rules(cfg: FreezeConfig, n_layers: int) -> list[Rule]:
    """The rules a preset compiles into (``rules``: none). ``n_layers``: the pretrained encoder's blocks."""
    first, b, w = first_position(cfg.unit), float(cfg.bert_lr_mult), int(cfg.warmup)
    label = f"freeze.policy={cfg.policy!r}"

    def rule(match: str, frozen: bool, start: Optional[int] = None, end: Optional[int] = None, lr: float = 1.0,
             warmup: int = 0, required: bool = False) -> Rule:
        return Rule(label, match, frozen, start, end, lr, warmup, first, required)

    def unfreeze(match: str, at: int) -> list[Rule]:
        """Frozen before ``at``, trainable (bert_lr_mult, warm-up) from it."""
        before = [rule(match, True, end=at)] if at > first else []
        return before + [rule(match, False, start=at, lr=b, warmup=w)]

    if cfg.policy == "frozen":
        return [rule("group:bert", True)]
    if cfg.policy == "finetune":
        return [rule("group:bert", False, lr=b)]
    if cfg.policy == "unfreeze_after":
        assert cfg.unfreeze_at is not None
        return unfreeze("group:bert", cfg.unfreeze_at)
    if cfg.policy == "gradual":  # ULMFiT: top block first, one more every `every` units, embeddings last
        start = first if cfg.unfreeze_at is None else cfg.unfreeze_at
        order = [f"group:bert.layer.{k}" for k in reversed(range(n_layers))] + ["group:bert.embeddings"]
        return [r for i, m in enumerate(order) for r in unfreeze(m, start + i * cfg.every)]
    if cfg.policy == "nmt_frozen":  # only the new BERT-attention modules train (until `until`)
        nmt = [rule(f"group:{g}", True, end=cfg.until, required=True) for g in ("encoder", "decoder", "embeddings")]
        return [rule("group:bert", True), *nmt, rule("group:fusion", False, required=True)]
    return []


class NameIndex:
    """The parameter names of one model, and what each ``match`` selects among them."""

    def __init__(self, names: list[str]):
        self.names = names
        self.group = {n: param_group(n) for n in names}
        self.layer = {n: bert_layer(n) for n in names if n.startswith("bert.")}
        self.n_layers = 1 + max((k for k in self.layer.values() if k is not None), default=-1)

    def select(self, rule: Rule) -> list[str]:
        """Names matched by ``rule.match``; an unknown group or layer is a :class:`ConfigError`."""
        match = rule.match
        if match.startswith("re:"):
            rx = re.compile(match[3:])
            return [n for n in self.names if rx.search(n)]
        if not match.startswith("group:"):
            return [n for n in self.names if fnmatch.fnmatchcase(n, match)]
        g = match[6:]
        if g in GROUPS or g in self.group.values():
            return [n for n in self.names if self.group[n] == g]
        if g == "bert.embeddings":
            return [n for n, k in self.layer.items() if k is None]
        m = re.fullmatch(r"bert\.layer\.(-?\d+)", g)
        if m is None:
            raise ConfigError(f"{rule.key()}: unknown parameter group {g!r} ({known_groups(tuple(self.group.values()))})")
        k, n_layers = int(m.group(1)), self.n_layers
        if not self.layer:
            return []
        if not -n_layers <= k < n_layers:
            raise ConfigError(f"{rule.key()}: the pretrained encoder has {n_layers} layers (0..{n_layers - 1}, "
                              f"or -{n_layers}..-1 from the top)")
        return [n for n, j in self.layer.items() if j == k % n_layers]
