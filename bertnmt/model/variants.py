"""The model variants of the paper's ablations (section 6; section 3 for the preliminary ones): the
checks that their keys fit together, in one place (each key's set of values is a :class:`~bertnmt.config.Choice`,
checked when the config is composed).

The variants themselves live where the architecture lives: the stacked combination in
``encoder.py`` / ``decoder.py``, the layer subset in their stacks, the feature-based input and the
replaced encoder in ``nmt.py``, the layer mix in ``layer_mix.py``, the random controls in
``pretrained.py``. Every check raises a one-line :class:`ConfigError` naming the key and value.
"""
from __future__ import annotations

import re

from bertnmt.core.config import BertConfig, Features, ModelConfig
from bertnmt.core.errors import ConfigError

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
    """The ablation keys of ``model``: a drop-net probability, and a layer subset that fits both stacks."""
    if not 0.0 <= cfg.drop_net <= 1.0:
        raise ConfigError(f"model.drop_net={cfg.drop_net} must be in [0, 1]")
    for n in (cfg.enc_layers, cfg.dec_layers):
        fused_layer_ids(cfg.fuse_layers, n)


def check_bert_config(cfg: BertConfig) -> None:
    """The ablation keys of ``bert``: the layer mix with a layer or with random features is refused."""
    if cfg.layer_mix and cfg.layer != -1:
        raise ConfigError(f"bert.layer_mix=true mixes all layers: leave bert.layer at -1 (it is {cfg.layer})")
    if cfg.layer_mix and cfg.features == Features.random:
        raise ConfigError("bert.layer_mix=true with bert.features=random: random features have no layers to mix")
