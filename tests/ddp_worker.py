"""Training scenarios for tests/test_distributed.py, run on every rank by
``python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py BERT_PATH OUT_DIR`` (gloo, CPU),
and in the test process itself as the one-process reference (:func:`run_scenario`).

Each scenario trains the tiny fused model on a small random corpus through :class:`bertnmt.train.trainer.Trainer`
and saves ``OUT_DIR/<scenario>.rank<r>.pt``: the final weights, the drop-net draws, the number of DDP
wrappers built, the step count and the per-epoch records.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from bertnmt.train import distributed
from bertnmt.core.config import BertConfig, Config, DataConfig, FreezeConfig, ModelConfig, OptimConfig, TrainerConfig
from bertnmt.data.prepare import PreparedData
from bertnmt.train.freeze import FreezePolicy
from bertnmt.model import decoder, encoder
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from bertnmt.train.trainer import Trainer
from fake_data import fake_data as shared_fake_data

# name -> (model overrides, freeze policy, epochs, accum_steps per rank under DDP)
SCENARIOS: dict[str, tuple[dict[str, Any], FreezeConfig, int, int]] = {
    # equivalence: no dropout, no drop-net; the encoder stays frozen
    "frozen": ({"dropout": 0.0, "drop_net": 0.0}, FreezeConfig(policy="frozen"), 3, 1),
    # equivalence across an unfreeze switch at update 3 (a new DDP wrapper that includes the encoder)
    "switch": ({"dropout": 0.0, "drop_net": 0.0}, FreezeConfig(policy="unfreeze_after", unit="step", unfreeze_at=3), 3, 1),
    # drop-net 1.0 (every forward skips one branch per layer), dropout, an unfreeze switch, 2 micro-batches per update
    "dropnet": ({"dropout": 0.1, "drop_net": 1.0}, FreezeConfig(policy="unfreeze_after", unit="step", unfreeze_at=2), 3, 2),
}


def fake_data(n: int = 48) -> PreparedData:
    """Random ids: target lengths 3..9, encoder ids [CLS] x [SEP] (ids 1000..1999 of the tiny BERT)."""
    return shared_fake_data(n, max_len=10)


def make_model(bert_path: str, model: ModelConfig) -> BertFusedTransformer:
    """The tiny fused model, the same on every rank; with ``model.dropout=0`` the encoder's dropout is off too."""
    torch.manual_seed(0)
    bert = PretrainedEncoder(BertConfig(path=bert_path))
    if model.dropout == 0.0:
        for m in bert.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # BERT's hidden and attention dropout (its SDPA call reads self.dropout.p)
    return BertFusedTransformer(model, vocab_size=50, pad_id=0, bert=bert)


class DrawLog:
    """Records every drop-net draw (w1, w2) made in training forwards."""

    def __init__(self) -> None:
        self.draws: list[tuple[float, float]] = []
        self.inner = encoder.drop_net_weights

    def __call__(self, p_net: float, training: bool) -> tuple[float, float]:
        w = self.inner(p_net, training)
        if training:
            self.draws.append(w)
        return w


def run_scenario(name: str, bert_path: str, run_dir: Path, accum: int) -> dict[str, Any]:
    """Train scenario ``name`` with ``accum`` micro-batches per update on this process."""
    overrides, freeze, epochs, _ = SCENARIOS[name]
    model_cfg = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, **overrides)
    cfg = Config(model=model_cfg, freeze=freeze, optim=OptimConfig(lr=1e-3, warmup_steps=3), data=DataConfig(max_tokens=60),
                 trainer=TrainerConfig(max_epochs=epochs, accum_steps=accum, device="cpu", valid_bleu=False,
                                       tensorboard=False, progress=False))
    log = DrawLog()
    encoder.drop_net_weights = decoder.drop_net_weights = log
    try:
        torch.manual_seed(123)
        trainer = Trainer(cfg, make_model(bert_path, model_cfg), fake_data(), FreezePolicy(freeze), run_dir, "fused", {},
                          enc_pad_id=0)
        result = trainer.fit()
    finally:
        encoder.drop_net_weights = decoder.drop_net_weights = log.inner
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
        "draws": log.draws, "wraps": trainer.replicas.wraps, "step": trainer.step, "epochs": result.epochs,
        "batches": [b for b in trainer.train_loader.batch_sampler.batches()],
    }


def main(bert_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    assert distributed.setup("cpu") and distributed.world_size() == 2, "run me under torchrun with 2 processes"
    out = Path(out_dir)
    for name, (_, _, _, accum) in SCENARIOS.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        res = run_scenario(name, bert_path, out / name, accum)
        torch.save(res, out / f"{name}.rank{distributed.rank()}.pt")
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
