"""The model variants of the paper's ablations (section 6; section 3 for the preliminary ones): their
names and checks, in one place.

The variants themselves live where the architecture lives: the stacked combination in
``encoder.py`` / ``decoder.py``, the layer subset in their stacks, the feature-based input and the
replaced encoder in ``nmt.py``, the layer mix in ``layer_mix.py``, the random controls in
``pretrained.py``. Every check raises a one-line :class:`ConfigError` naming the key and value.
"""
from __future__ import annotations

import re

from bertnmt.core.config import BertConfig, ModelConfig
from bertnmt.core.errors import ConfigError

FUSION_COMBINE = ("average", "stacked")
BERT_INPUTS = ("fused", "embedding", "replace")
BERT_FEATURES = ("pretrained", "random")
_SUBSET = re.compile(r"(first|last):(\d+)")


def fused_layer_ids(spec: str, n_layers: int, key: str = "model.fuse_layers") -> frozenset[int]:
    """The indexes of the layers that get BERT attention: ``all``, ``first:K`` or ``last:K`` (1 <= K <= n)."""
    spec = spec.strip()
    if spec == "all":
        return frozenset(range(n_layers))
    m = _SUBSET.fullmatch(spec)
    if m is None:
        raise ConfigError(f"{key}={spec!r} is not one of: all, first:K, last:K")
    k = int(m.group(2))
    if not 1 <= k <= n_layers:
        raise ConfigError(f"{key}={spec!r}: K must be between 1 and the {n_layers} layers of the stack")
    return frozenset(range(k)) if m.group(1) == "first" else frozenset(range(n_layers - k, n_layers))


def check_model_config(cfg: ModelConfig) -> None:
    """The ablation keys of ``model``: known values, and a layer subset that fits both stacks."""
    if cfg.fusion_combine not in FUSION_COMBINE:
        raise ConfigError(f"model.fusion_combine={cfg.fusion_combine!r} is not one of {', '.join(FUSION_COMBINE)}")
    if cfg.bert_input not in BERT_INPUTS:
        raise ConfigError(f"model.bert_input={cfg.bert_input!r} is not one of {', '.join(BERT_INPUTS)}")
    if not 0.0 <= cfg.drop_net <= 1.0:
        raise ConfigError(f"model.drop_net={cfg.drop_net} must be in [0, 1]")
    for n in (cfg.enc_layers, cfg.dec_layers):
        fused_layer_ids(cfg.fuse_layers, n)


def check_bert_config(cfg: BertConfig) -> None:
    """The ablation keys of ``bert``."""
    if cfg.features not in BERT_FEATURES:
        raise ConfigError(f"bert.features={cfg.features!r} is not one of {', '.join(BERT_FEATURES)}")
    if cfg.layer_mix and cfg.layer != -1:
        raise ConfigError(f"bert.layer_mix=true mixes all layers: leave bert.layer at -1 (it is {cfg.layer})")
    if cfg.layer_mix and cfg.features == "random":
        raise ConfigError("bert.layer_mix=true with bert.features=random: random features have no layers to mix")
