"""The paper's recipe as one call: prepare data, (train or reuse) the plain baseline,
warm-start and train the BERT-fused model, decode the test set, compare the two.

Paper section 5: the NMT part of the fused model starts from a plain Transformer of the
same vocabulary (27.03 BLEU without that warm start against 30.45 with it on IWSLT'14 En-De).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from bertnmt.checkpoint import warm_start
from bertnmt.config import Config, FreezeConfig, TrainerConfig
from bertnmt.data.collate import make_loader
from bertnmt.data.prepare import PreparedData, add_encoder_view, prepare_data
from bertnmt.data.tokenize import EncoderTokenizer, SubwordVocab
from bertnmt.errors import ConfigError
from bertnmt.freeze import FreezePolicy, schedule_table
from bertnmt.metrics import corpus_scores
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import PretrainedEncoder
from bertnmt.training import StageResult, Trainer, append_jsonl, load_best, pick_device, translate_split

log = logging.getLogger(__name__)

BASELINE_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def weights_sha256(module: torch.nn.Module) -> str:
    """A hash of a module's weights (recorded instead of storing a frozen encoder in checkpoints)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_model(cfg: Config, vocab_size: int, pad_id: int = SubwordVocab.pad_id) -> BertFusedTransformer:
    bert = PretrainedEncoder(cfg.bert) if cfg.model.fused else None
    return BertFusedTransformer(cfg.model, vocab_size, pad_id, bert)


def check_freeze(cfg: Config) -> tuple[FreezePolicy, BertFusedTransformer]:
    """The freeze policy, checked against a model built before any data (vocabulary size from
    ``data.vocab_size``): a bad rule, window or group is a ConfigError here, not after data preparation."""
    policy = FreezePolicy(cfg.freeze)
    model = make_model(cfg, cfg.data.vocab_size)
    return policy.bind(model), model


# ModelConfig fields that do not change the plain baseline (all fusion-only; the ablations' variants too).
FUSION_ONLY = ("name", "fused", "fuse_encoder", "fuse_decoder", "drop_net", "fusion_combine", "fuse_layers", "bert_input")


def baseline_key(cfg: Config, data: PreparedData) -> str:
    """Everything that determines the plain baseline: data, vocabulary, NMT dims, optimiser, budget, seed.

    Fusion-only settings (``FUSION_ONLY``) are left out, so every warm-started ablation row shares one
    cached baseline, and the keys of baselines cached before the ablation fields existed still hold."""
    model = {k: v for k, v in asdict(cfg.model).items() if k not in FUSION_ONLY}
    spec = {
        "version": BASELINE_VERSION, "data": data.key, "vocab": data.vocab.sha256, "model": model,
        "optim": asdict(cfg.optim), "seed": cfg.trainer.seed, "accum": cfg.trainer.accum_steps,
        "epochs": cfg.warm_start.max_epochs, "steps": cfg.warm_start.max_steps, "max_tokens": cfg.data.max_tokens,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def finish_stage(cfg: Config, model: torch.nn.Module, data: PreparedData, result: StageResult, run_dir: Path,
                 enc_pad_id: int | None) -> dict[str, Any]:
    """Load the stage's best checkpoint, decode the test split with beam search, score it."""
    load_best(model, result.best_path)
    out: dict[str, Any] = {
        "epochs": len(result.epochs),
        "mean_epoch_time_s": round(result.mean_epoch_time, 2),
        "tokens_per_s": round(sum(e["tokens_per_s"] for e in result.epochs) / max(1, len(result.epochs)), 1),
        "best_valid_bleu": max((e.get("valid_bleu", float("nan")) for e in result.epochs), default=None),
        "trainable_params": result.epochs[-1]["trainable_params"] if result.epochs else None,
        "total_params": result.epochs[-1]["total_params"] if result.epochs else None,
        "checkpoint": str(result.best_path),
    }
    if not cfg.eval.test:
        return out
    split = data.splits["test"]
    device = pick_device(cfg.trainer.device)
    start = time.perf_counter()
    hyps = translate_split(model, data, split, cfg, device, cfg.eval.beam, enc_pad_id)
    decode_s = time.perf_counter() - start
    hyp_path = run_dir / f"test.{result.stage}.hyp"
    hyp_path.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    (run_dir / "test.ref").write_text("".join(r + "\n" for r in split.tgt_text), encoding="utf-8")
    score = corpus_scores(hyps, split.tgt_text, cfg.data.tgt_lang)
    rec = {"stage": result.stage, "split": "test", "beam": cfg.eval.beam, "lenpen": cfg.eval.lenpen,
           "hypotheses": hyp_path.name, "decode_time_s": round(decode_s, 2), **score.to_dict()}
    append_jsonl(run_dir / "results.jsonl", rec)
    log.info("[%s] test BLEU %.2f chrF %.2f (beam %d, %.1f s) | %s", result.stage, score.bleu, score.chrf,
             cfg.eval.beam, decode_s, score.bleu_signature)
    out.update(test_bleu=score.bleu, test_chrf=score.chrf, bleu_signature=score.bleu_signature,
               chrf_signature=score.chrf_signature, decode_time_s=round(decode_s, 2))
    return out


def train_stage(cfg: Config, data: PreparedData, run_dir: Path, stage: str, meta: dict[str, Any],
                enc_pad_id: int | None, warm: str | None = None) -> dict[str, Any]:
    """Build, (warm-start,) train and test one model."""
    seed_everything(cfg.trainer.seed)
    model = make_model(cfg, len(data.vocab), data.vocab.pad_id)
    if model.bert is not None:
        meta["encoder"]["weights_sha256"] = weights_sha256(model.bert)
        write_json(run_dir / "meta.json", meta)
    if warm:
        warm_start(model, warm, data.vocab.sha256)
    policy = FreezePolicy(cfg.freeze)
    trainer = Trainer(cfg, model, data, policy, run_dir, stage, meta, enc_pad_id)
    result = trainer.fit()
    return finish_stage(cfg, model, data, result, run_dir, enc_pad_id)


def ensure_baseline(cfg: Config, data: PreparedData, run_dir: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The warm-start checkpoint: reused from the cache when data, vocabulary and settings match, else trained now."""
    key = baseline_key(cfg, data)
    cache = Path(cfg.data.cache_dir) / "baselines" / key
    ckpt, summary_path = cache / "checkpoint.pt", cache / "summary.json"
    if ckpt.is_file() and summary_path.is_file():
        log.info("reusing the cached baseline %s (same data, vocabulary and settings)", cache)
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        return ckpt, {**summary, "reused_from": str(cache)}
    log.info("training the plain Transformer baseline for the warm start (cached as %s)", cache)
    bcfg = replace(
        cfg,
        model=replace(cfg.model, fused=False),
        freeze=FreezeConfig(policy="finetune"),  # the warm-start baseline trains everything, whatever the fused policy
        trainer=replace(cfg.trainer, max_epochs=cfg.warm_start.max_epochs, max_steps=cfg.warm_start.max_steps),
    )
    summary = train_stage(bcfg, data, run_dir, "baseline", {**meta, "model": asdict(bcfg.model)}, None)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / "checkpoint.pt.tmp"
    shutil.copyfile(summary["checkpoint"], tmp)
    os.replace(tmp, ckpt)
    write_json(summary_path, summary)
    return ckpt, summary


def scratch_trainer(cfg: Config, data: PreparedData) -> TrainerConfig:
    """The budget of a run that does not warm-start (``warm_start.scratch_budget``).

    "stage": ``trainer`` as it is. "total": the epochs (and updates) of the baseline stage plus those of the
    fused stage, so a from-scratch ablation row trains as long as a warm-started row does in all. When a
    stage is limited by ``max_steps``, the total is counted in updates, the baseline's from its own batches.
    """
    t, w = cfg.trainer, cfg.warm_start
    if w.scratch_budget == "stage":
        return t
    epochs = w.max_epochs + t.max_epochs
    if not (w.max_steps or t.max_steps):
        return replace(t, max_epochs=epochs)
    per_epoch = len(make_loader(data.splits["train"], cfg.data.max_tokens, t.seed, True, None)) // max(1, t.accum_steps)
    stage_steps = lambda e, s: min(e * per_epoch, s) if s else e * per_epoch  # noqa: E731
    return replace(t, max_epochs=epochs, max_steps=stage_steps(w.max_epochs, w.max_steps) + stage_steps(t.max_epochs, t.max_steps))


def check_recipe(cfg: Config) -> None:
    if cfg.warm_start.scratch_budget not in ("stage", "total"):
        raise ConfigError(f"warm_start.scratch_budget={cfg.warm_start.scratch_budget!r} is not one of stage, total")


def run(cfg: Config) -> dict[str, Any]:
    """Run the configured experiment in ``cfg.output_dir``; returns the summary (also in summary.json).

    Stages: a fused model (``model.fused``) is warm-started from ``warm_start.path`` or, with
    ``warm_start.auto``, from the cached plain baseline, and trains as stage "fused". A plain model trains as
    stage "baseline"; with a warm start it continues the baseline as stage "transformer" (the ablations'
    Transformer row: the same epochs in all as baseline + fused stage). ``summary["final_stage"]`` names the
    stage whose test BLEU is the run's result.
    """
    check_recipe(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    policy, skeleton = check_freeze(cfg)  # a bad policy fails before any data is loaded
    if cfg.freeze.dry_run:
        table = schedule_table(policy, skeleton, cfg.trainer.max_epochs, cfg.trainer.max_steps)
        print(f"{table}\n(dry run: model {cfg.model.name} with data.vocab_size={cfg.data.vocab_size}; nothing was trained)")
        return {"name": cfg.name, "dry_run": True, "table": table}
    del policy, skeleton
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    start = time.perf_counter()
    data = prepare_data(cfg.data)
    enc_pad_id = None
    meta: dict[str, Any] = {
        "git_sha": git_sha(), "command": " ".join(sys.argv), "torch": str(torch.__version__),
        "data_key": data.key, "vocab_sha256": data.vocab.sha256, "vocab_size": len(data.vocab),
        "data_report": data.report, "model": asdict(cfg.model),
    }
    if cfg.model.fused:
        tok = EncoderTokenizer(cfg.bert.path, cfg.bert.max_length, cfg.bert.trust_remote_code)
        add_encoder_view(data, tok)
        enc_pad_id = tok.pad_id
        meta["encoder"] = {"name": cfg.bert.name, "path": cfg.bert.path, "layer": cfg.bert.layer,
                           "layer_mix": cfg.bert.layer_mix, "features": cfg.bert.features,
                           "random_init": cfg.bert.random_init}
    write_json(run_dir / "meta.json", meta)

    summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(run_dir)}
    warm = cfg.warm_start.path
    if warm is None and cfg.warm_start.auto:
        ckpt, summary["baseline"] = ensure_baseline(cfg, data, run_dir, meta)
        warm = str(ckpt)
    stage = "fused" if cfg.model.fused else ("transformer" if warm else "baseline")
    scfg = cfg if warm else replace(cfg, trainer=scratch_trainer(cfg, data))
    summary[stage] = train_stage(scfg, data, run_dir, stage, meta, enc_pad_id, warm)
    summary["warm_start"] = warm
    summary["final_stage"] = stage
    summary["total_time_s"] = round(time.perf_counter() - start, 1)
    base, fused = summary.get("baseline"), summary.get("fused")
    if base and fused and base.get("mean_epoch_time_s"):
        summary["epoch_time_ratio"] = round(fused["mean_epoch_time_s"] / base["mean_epoch_time_s"], 3)
    last = summary[stage]
    if "bleu_signature" in last:
        meta["sacrebleu_signature"] = last["bleu_signature"]
        write_json(run_dir / "meta.json", meta)
    write_json(run_dir / "summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    base, fused = summary.get("baseline"), summary.get("fused") or summary.get("transformer")
    second = "BERT-fused" if "fused" in summary else "Transformer (continued)"
    rows = [("baseline (Transformer)", base), (second, fused)]
    lines = [f"{'model':<24} {'test BLEU':>9} {'chrF':>6} {'epoch s':>8} {'tok/s':>7} {'trainable/total':>22}"]
    for label, s in rows:
        if not s:
            continue
        params = f"{s.get('trainable_params') or 0:,}/{s.get('total_params') or 0:,}"
        lines.append(f"{label:<24} {s.get('test_bleu', float('nan')):>9.2f} {s.get('test_chrf', float('nan')):>6.2f} "
                     f"{s['mean_epoch_time_s']:>8.1f} {s['tokens_per_s']:>7.0f} {params:>22}")
    if "epoch_time_ratio" in summary:
        lines.append(f"epoch-time ratio fused / baseline: {summary['epoch_time_ratio']:.2f}")
    if (last := fused or base) and "bleu_signature" in last:
        lines.append(f"sacreBLEU: {last['bleu_signature']}")
    lines.append(f"total time {summary['total_time_s']:.0f} s; run directory {summary['run_dir']}")
    print("\n".join(lines))
