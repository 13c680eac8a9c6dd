"""What the cached plain baseline depends on: the one definition behind the pipeline's baseline cache
(:func:`baseline_key`) and the ablation runner's check that its warm-started rows share one baseline
(:func:`baseline_identity`).

Paper section 5: the fused model's NMT part starts from a plain Transformer. The fusion settings
(:data:`FUSION_ONLY`) do not change that Transformer, so every fused variant with the same data, NMT
dimensions, optimiser, budget and seed warm-starts from the same cached baseline.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from bertnmt.core.config import Config
from bertnmt.data.prepare import PreparedData, cache_folder
from bertnmt.train import distributed

BASELINE_VERSION = 1

# ModelConfig fields that do not change the plain baseline (the fusion settings, the ablations' variants too).
FUSION_ONLY = ("name", "fused", "fuse_encoder", "fuse_decoder", "drop_net", "fusion_combine", "fuse_layers",
               "bert_input")


def baseline_inputs(cfg: Config) -> dict[str, Any]:
    """The settings of ``cfg`` the plain baseline depends on, besides its data and vocabulary: NMT dimensions
    (``model`` without :data:`FUSION_ONLY`), optimiser, seed, effective accumulation, budget, batch size."""
    return {
        "model": {k: v for k, v in asdict(cfg.model).items() if k not in FUSION_ONLY},
        "optim": asdict(cfg.optim), "seed": cfg.trainer.seed,
        "accum": cfg.trainer.accum_steps * distributed.world_size(),  # N ranks x a = one process x a*N
        "epochs": cfg.warm_start.max_epochs, "steps": cfg.warm_start.max_steps, "max_tokens": cfg.data.max_tokens,
    }


def baseline_key(cfg: Config, data: PreparedData) -> str:
    """The baseline cache's key: :func:`baseline_inputs` with the prepared data and its vocabulary.

    Fusion-only settings are left out, so every warm-started ablation row shares one cached baseline, and
    the keys of baselines cached before the ablation fields existed still hold."""
    spec = {"version": BASELINE_VERSION, "data": data.key, "vocab": data.vocab.sha256, **baseline_inputs(cfg)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def baseline_identity(cfg: Config) -> dict[str, Any]:
    """What :func:`baseline_key` will hash, known before any data is prepared: the prepared data's cache key
    (which fixes its vocabulary) and :func:`baseline_inputs`. Two configs with equal identities share one baseline."""
    return {"data": cache_folder(cfg.data)[0], **baseline_inputs(cfg)}
