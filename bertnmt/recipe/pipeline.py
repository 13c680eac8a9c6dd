"""The paper's recipe as one call: prepare data, (train or reuse) the plain baseline,
warm-start and train the BERT-fused model, decode the test set, compare the two.

Paper section 5: the NMT part of the fused model starts from a plain Transformer of the
same vocabulary (27.03 BLEU without that warm start against 30.45 with it on IWSLT'14 En-De).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from bertnmt.core import atomic
from bertnmt.core.paths import PROJECT_ROOT

from bertnmt.train import distributed  # torchrun; no-ops in one process
from bertnmt.train.checkpoint import load_checkpoint, warm_start
from bertnmt.core.config import Config, EarlyStopConfig, FreezeConfig, TrainerConfig, check_device, check_values
from bertnmt.data.collate import make_loader
from bertnmt.data.corpora import corpus_fingerprint
from bertnmt.data.features import FeatureStore, feature_cache
from bertnmt.data.prepare import PreparedData, add_encoder_view, prepare_data
from bertnmt.data.tokenize import EncoderTokenizer
from bertnmt.decoding.loop import decode_split, options_from_eval
from bertnmt.core.devices import pick_device
from bertnmt.core.errors import BertNMTError, CheckpointError, ConfigError, DataError
from bertnmt.recipe.export import export_model
from bertnmt.train.freeze import FreezePolicy, schedule_table
from bertnmt.decoding.metrics import corpus_scores
from bertnmt.model.build import make_model, weights_sha256
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.model.pretrained import check_tokenizer
from bertnmt.train.results import append_jsonl
from bertnmt.train.rundir import CONFIG, open_run_dir, release, save_config, stage_marker
from bertnmt.train.early_stop import best_epoch
from bertnmt.train.trainer import StageResult, Trainer, load_best

log = logging.getLogger(__name__)

BASELINE_VERSION = 1


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


def write_json(path: Path, obj: Any) -> None:
    if not distributed.is_main():  # rank 0 writes the run's files
        return
    atomic.write_json(path, obj)


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
        "optim": asdict(cfg.optim), "seed": cfg.trainer.seed,
        "accum": cfg.trainer.accum_steps * distributed.world_size(),  # N ranks x a = one process x a*N
        "epochs": cfg.warm_start.max_epochs, "steps": cfg.warm_start.max_steps, "max_tokens": cfg.data.max_tokens,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_metric(t: TrainerConfig) -> EarlyStopConfig:
    """The validation metric that picks a stage's best checkpoint (as in ``Trainer._run_epoch``)."""
    if t.early_stop.patience:
        return t.early_stop
    return EarlyStopConfig(metric="bleu" if t.valid_bleu else "loss")


def finish_stage(cfg: Config, model: torch.nn.Module, data: PreparedData, result: StageResult, run_dir: Path,
                 enc_pad_id: int | None, features: FeatureStore | None = None) -> dict[str, Any]:
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
        "steps": int(result.epochs[-1]["step"]) if result.epochs else 0,
        "stop": result.stop,  # max_epochs | max_steps | early_stop
        "best_epoch": best_epoch(result.epochs, checkpoint_metric(cfg.trainer)),
    }
    if not cfg.eval.test or not distributed.is_main():  # the test decode on rank 0 only
        return out
    split = data.splits["test"]
    device = pick_device(cfg.trainer.device)
    start = time.perf_counter()
    opts = options_from_eval(cfg.eval, precision=cfg.trainer.precision)
    hyps = decode_split(model, split, data.vocab, opts, device, enc_pad_id, features)
    decode_s = time.perf_counter() - start
    hyp_path = run_dir / f"test.{result.stage}.hyp"
    atomic.write_text(hyp_path, "".join(h + "\n" for h in hyps))
    atomic.write_text(run_dir / "test.ref", "".join(r + "\n" for r in split.tgt_text))
    score = corpus_scores(hyps, split.tgt_text, cfg.data.tgt_lang)
    rec = {"stage": result.stage, "split": "test", "beam": cfg.eval.beam, "lenpen": cfg.eval.lenpen,
           "hypotheses": hyp_path.name, "decode_time_s": round(decode_s, 2), **score.to_dict()}
    append_jsonl(run_dir / "results.jsonl", rec)
    log.info("[%s] test BLEU %.2f chrF %.2f (beam %d, %.1f s) | %s", result.stage, score.bleu, score.chrf,
             cfg.eval.beam, decode_s, score.bleu_signature)
    out.update(test_bleu=score.bleu, test_chrf=score.chrf, bleu_signature=score.bleu_signature,
               chrf_signature=score.chrf_signature, decode_time_s=round(decode_s, 2))
    return out


Explicit = tuple[Path, str] | None  # trainer.resume=PATH: the checkpoint and its stage


def check_resume_inputs(cfg: Config) -> Explicit:
    """Before any data: ``trainer.resume`` and ``warm_start.path`` must be readable checkpoints of this format."""
    mode = cfg.trainer.resume
    explicit: Explicit = None
    if mode not in ("auto", "never"):
        if not Path(mode).is_file():
            raise ConfigError(f"trainer.resume={mode!r} is neither auto, never nor a checkpoint file")
        ckpt = load_checkpoint(mode)
        if (ckpt.get("meta") or {}).get("averaged_from"):
            raise CheckpointError(f"trainer.resume={mode}: an average of checkpoints holds no training state; resume from "
                                  "one of the checkpoints it averages (or start from it with warm_start.path)")
        lacking = [k for k in ("optimizer", "scheduler", "epoch", "step") if k not in ckpt]
        if lacking:
            raise CheckpointError(f"trainer.resume={mode}: the checkpoint lacks the training state ({', '.join(lacking)}); "
                                  "resume from a checkpoint the training wrote")
        explicit = (Path(mode), str(ckpt.get("stage") or ("fused" if cfg.model.fused else "baseline")))
        del ckpt
    if cfg.warm_start.path is not None and cfg.model.fused:
        load_checkpoint(cfg.warm_start.path)
    return explicit


def resume_source(cfg: Config, run_dir: Path, stage: str, explicit: Explicit) -> Path | None:
    """Where ``stage`` resumes from: the explicit checkpoint, its own checkpoint folder (auto), or nowhere."""
    if explicit is not None:
        return explicit[0] if explicit[1] == stage else None
    folder = run_dir / "checkpoints" / stage
    if cfg.trainer.resume == "auto" and any(folder.glob("checkpoint_*.pt")):
        return folder
    return None


def train_stage(cfg: Config, data: PreparedData, run_dir: Path, stage: str, meta: dict[str, Any],
                enc_pad_id: int | None, warm: str | None = None, explicit: Explicit = None) -> dict[str, Any]:
    """Build, (warm-start or resume,) train and test one model; a stage finished in this run folder is not retrained."""
    marker = stage_marker(run_dir, stage)
    if marker.is_file() and cfg.trainer.resume == "auto":
        log.info("[%s] finished earlier in this run (%s): not trained again", stage, marker.name)
        return json.loads(marker.read_text(encoding="utf-8"))
    seed_everything(cfg.trainer.seed)
    model = make_model(cfg, len(data.vocab), data.vocab.pad_id)
    if model.bert is not None:
        meta["encoder"]["weights_sha256"] = weights_sha256(model.bert)
        write_json(run_dir / "meta.json", meta)
    resume = resume_source(cfg, run_dir, stage, explicit)
    if warm and resume is None:  # a resumed stage gets its weights from its checkpoint
        warm_start(model, warm, data.vocab.sha256)
    policy = FreezePolicy(cfg.freeze)
    features = None
    if model.bert is not None and enc_pad_id is not None and model.features_cacheable:
        policy.apply(model, epoch=1, step=0)  # a resumed Trainer re-checks at its own position
        device = pick_device(cfg.trainer.device)
        model.bert.to(device)
        with distributed.main_first():  # rank 0 writes the feature cache, the others read it
            features = feature_cache(model.bert, data, meta["encoder"]["weights_sha256"], enc_pad_id, device,
                                     cfg.bert.cache_budget_gb, cfg.bert.cache_features, policy.encoder_untrained(model))
    trainer = Trainer(cfg, model, data, policy, run_dir, stage, meta, enc_pad_id, resume=resume, features=features)
    result = trainer.fit()
    summary = finish_stage(cfg, model, data, result, run_dir, enc_pad_id, trainer.features.get("test"))
    write_json(marker, summary)
    return summary


def ensure_baseline(cfg: Config, data: PreparedData, run_dir: Path, meta: dict[str, Any],
                    explicit: Explicit = None) -> tuple[Path, dict[str, Any]]:
    """The warm-start checkpoint: reused from the cache when data, vocabulary and settings match, else trained now."""
    key = baseline_key(cfg, data)
    cache = Path(cfg.data.cache_dir) / "baselines" / key
    ckpt, summary_path = cache / "checkpoint.pt", cache / "summary.json"
    if ckpt.is_file() and summary_path.is_file():
        try:
            load_checkpoint(ckpt)
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (CheckpointError, OSError, ValueError) as e:
            log.warning("the cached baseline %s is unreadable (%s); training it again", cache, e)
        else:
            log.info("reusing the cached baseline %s (same data, vocabulary and settings)", cache)
            return ckpt, {**summary, "reused_from": str(cache)}
    log.info("training the plain Transformer baseline for the warm start (cached as %s)", cache)
    bcfg = replace(
        cfg,
        model=replace(cfg.model, fused=False),
        freeze=FreezeConfig(policy="finetune"),  # the warm-start baseline trains everything, whatever the fused policy
        # a fixed budget: early stopping would make the cached baseline depend on a setting its key leaves out
        trainer=replace(cfg.trainer, max_epochs=cfg.warm_start.max_epochs, max_steps=cfg.warm_start.max_steps,
                        early_stop=EarlyStopConfig()),
    )
    summary = train_stage(bcfg, data, run_dir, "baseline", {**meta, "model": asdict(bcfg.model)}, None, explicit=explicit)
    if distributed.is_main():  # rank 0 fills the cache, the others wait for it
        atomic.remove_stale_temps(cache)
        atomic.copy_file(summary["checkpoint"], ckpt)  # the checkpoint first: the summary marks the entry complete
        write_json(summary_path, summary)
    distributed.barrier()
    return ckpt, summary


CONTINUED_VERSION = 1


def continued_key(cfg: Config, data: PreparedData, warm: str, steps: int) -> str:
    """Everything that determines the Transformer continued from ``warm`` for ``steps`` updates: the warm
    start's bytes, the baseline's inputs (:func:`baseline_key`), the update count and the test decoding."""
    with open(warm, "rb") as fh:
        warm_sha = hashlib.file_digest(fh, "sha256").hexdigest()
    spec = {"version": CONTINUED_VERSION, "baseline": baseline_key(cfg, data), "warm": warm_sha, "steps": steps,
            "eval": asdict(cfg.eval), "valid_bleu": cfg.trainer.valid_bleu, "valid_max_sents": cfg.trainer.valid_max_sents}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_continued(cfg: Config, data: PreparedData, run_dir: Path, meta: dict[str, Any], warm: str, steps: int,
                     explicit: Explicit = None) -> dict[str, Any]:
    """The plain Transformer continued from the same warm start for exactly ``steps`` updates (stage
    "transformer"): the equal-budget counterpart of the fused stage. Cached like the baseline, with its
    test hypotheses, under ``<data.cache_dir>/continued/<key>/``."""
    key = continued_key(cfg, data, warm, steps)
    cache = Path(cfg.data.cache_dir) / "continued" / key
    hyp_name = "test.transformer.hyp"
    summary_path = cache / "summary.json"
    if summary_path.is_file() and (not cfg.eval.test or (cache / hyp_name).is_file()):
        log.info("reusing the cached continued Transformer %s (same warm start, %d updates)", cache, steps)
        if cfg.eval.test and distributed.is_main():
            atomic.copy_file(cache / hyp_name, run_dir / hyp_name)
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        return {**summary, "reused_from": str(cache)}
    log.info("training the plain Transformer from the same warm start for %d updates (equal budget; cached as %s)",
             steps, cache)
    tcfg = replace(
        cfg,
        model=replace(cfg.model, fused=False),
        freeze=FreezeConfig(policy="finetune"),
        # the fused stage's update count is the budget; the epoch cap only has to be out of its way
        trainer=replace(cfg.trainer, max_steps=steps, max_epochs=max(1, steps) * cfg.trainer.accum_steps + 1,
                        early_stop=EarlyStopConfig()),
    )
    summary = train_stage(tcfg, data, run_dir, "transformer", {**meta, "model": asdict(tcfg.model)}, None, warm,
                          explicit)
    if distributed.is_main():
        atomic.remove_stale_temps(cache)
        if (run_dir / hyp_name).is_file():
            atomic.copy_file(run_dir / hyp_name, cache / hyp_name)  # the hypotheses first: the summary marks it complete
        write_json(summary_path, summary)
    distributed.barrier()
    return summary


def equal_budget(summary: dict[str, Any], run_dir: Path, tgt_lang: str) -> dict[str, Any] | None:
    """The fused stage against the continued Transformer: updates, test BLEU/chrF and sacreBLEU's paired
    bootstrap on their test hypotheses (None when either was not decoded)."""
    from bertnmt.decoding.significance import compare_files

    fused, plain = summary.get("fused"), summary.get("transformer")
    if not fused or not plain or "test_bleu" not in fused or "test_bleu" not in plain:
        return None
    out: dict[str, Any] = {"updates": {"fused": fused["steps"], "transformer": plain["steps"]},
                           "bleu_delta": round(fused["test_bleu"] - plain["test_bleu"], 2),
                           "chrf_delta": round(fused["test_chrf"] - plain["test_chrf"], 2)}
    files = [run_dir / "test.ref", run_dir / "test.transformer.hyp", run_dir / "test.fused.hyp"]
    if all(f.is_file() for f in files):
        out["paired_bootstrap"] = compare_files(*files, tgt_lang=tgt_lang)
    return out


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
    """Run the configured experiment; returns the summary (also in summary.json).

    The run folder is ``cfg.output_dir``, or with ``trainer.resume=auto`` the unfinished run of the same
    config that this call continues (see :mod:`bertnmt.train.rundir`; ``cfg.output_dir`` is updated).

    Stages: a fused model (``model.fused``) is warm-started from ``warm_start.path`` or, with
    ``warm_start.auto``, from the cached plain baseline, and trains as stage "fused". A plain model trains as
    stage "baseline"; with a warm start it continues the baseline as stage "transformer" (the ablations'
    Transformer row: the same epochs in all as baseline + fused stage). ``summary["final_stage"]`` names the
    stage whose test BLEU is the run's result.
    """
    check_values(cfg)  # also checked on the command line; here for library callers
    check_device(cfg.trainer.device)
    check_recipe(cfg)
    if cfg.model.fused and cfg.bert.trust_remote_code:
        log.warning("bert.trust_remote_code=true: Python code shipped with the encoder %r will run", cfg.bert.path)
    ddp = distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_min)  # under torchrun
    policy, skeleton = check_freeze(cfg)  # a bad policy fails before any data is loaded
    if cfg.freeze.dry_run:
        table = schedule_table(policy, skeleton, cfg.trainer.max_epochs, cfg.trainer.max_steps)
        print(f"{table}\n(dry run: model {cfg.model.name} with data.vocab_size={cfg.data.vocab_size}; nothing was trained)")
        return {"name": cfg.name, "dry_run": True, "table": table}
    del policy, skeleton
    explicit = check_resume_inputs(cfg)
    tok = encoder_tokenizer(cfg) if cfg.model.fused else None  # a tokenizer that does not fit fails before any write
    run_dir = open_run_dir(cfg) if distributed.is_main() else None  # rank 0 picks the run folder
    if ddp:
        run_dir = Path(distributed.broadcast(str(run_dir) if run_dir is not None else None))
        cfg.output_dir = str(run_dir)
    fresh = not (run_dir / CONFIG).is_file()
    try:
        return _run(cfg, run_dir, explicit, tok)
    except BertNMTError:
        if fresh and distributed.is_main() and not (run_dir / "checkpoints").exists():  # no half-written outputs
            for name in (CONFIG, "meta.json", "results.jsonl"):
                (run_dir / name).unlink(missing_ok=True)
        raise
    finally:
        if distributed.is_main():
            release(run_dir)


def _earlier_meta(run_dir: Path) -> dict[str, Any] | None:
    """The meta.json of the run this call resumes (one with checkpoints), or None."""
    path = run_dir / "meta.json"
    if not (run_dir / "checkpoints").is_dir() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_same_inputs(cfg: Config, run_dir: Path, earlier: dict[str, Any]) -> None:
    """A resumed run reads the data its checkpoints were trained on: a changed input file is a DataError naming it
    (a new SentencePiece model of the same size would silently give most ids another meaning)."""
    before = (earlier.get("data_report") or {}).get("inputs") or {}
    now = corpus_fingerprint(cfg.data)
    for name, sha in before.items():
        if now.get(name) != sha:
            split, _, side = name.partition(".")
            where = (f"{cfg.data.custom[split][side]} (data.custom.{name})" if cfg.data.corpus == "custom"
                     and split in cfg.data.custom and side in cfg.data.custom[split] else name)
            raise DataError(f"{where} changed since the run in {run_dir} started (sha256 {sha[:12]} then, "
                            f"{str(now.get(name))[:12]} now); its checkpoints belong to the old data: restore the file, "
                            "or start afresh with trainer.resume=never")


def encoder_tokenizer(cfg: Config) -> EncoderTokenizer:
    """The pretrained encoder's tokenizer, checked against the encoder (ids in its table, a real vocabulary)."""
    tok = EncoderTokenizer(cfg.bert.path, cfg.bert.max_length, cfg.bert.trust_remote_code)
    check_tokenizer(cfg.bert, len(tok), tok.pad_id)  # a tokenizer of another encoder, or none, is a ConfigError
    return tok


def _run(cfg: Config, run_dir: Path, explicit: Explicit, tok: EncoderTokenizer | None) -> dict[str, Any]:
    earlier = _earlier_meta(run_dir) if explicit is None else None
    if earlier is not None:
        check_same_inputs(cfg, run_dir, earlier)
    if distributed.is_main():
        save_config(cfg, run_dir)
    start = time.perf_counter()
    with distributed.main_first():  # rank 0 prepares the data cache, the others read it
        data = prepare_data(cfg.data)
    if earlier is not None and earlier.get("vocab_sha256") not in (None, data.vocab.sha256):
        raise DataError(f"{data.vocab.path}: the SentencePiece vocabulary differs from the one the checkpoints in "
                        f"{run_dir} were trained with; start afresh with trainer.resume=never")
    enc_pad_id = None
    meta: dict[str, Any] = {
        "git_sha": git_sha(), "command": " ".join(sys.argv), "torch": str(torch.__version__),
        "data_key": data.key, "vocab_sha256": data.vocab.sha256, "vocab_size": len(data.vocab),
        "data_report": data.report, "model": asdict(cfg.model),
        # checkpoints carry their config and vocabulary, so evaluate/translate/export need no run dir
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)), "vocab_path": str(data.vocab.path.resolve()),
    }
    if tok is not None:
        with distributed.main_first():
            add_encoder_view(data, tok)
        enc_pad_id = tok.pad_id
        meta["encoder"] = {"name": cfg.bert.name, "path": cfg.bert.path, "layer": cfg.bert.layer,
                           "layer_mix": cfg.bert.layer_mix, "features": cfg.bert.features,
                           "random_init": cfg.bert.random_init}
    write_json(run_dir / "meta.json", meta)

    summary: dict[str, Any] = {"name": cfg.name, "run_dir": str(run_dir)}
    warm = cfg.warm_start.path
    if warm is None and cfg.warm_start.auto:
        ckpt, summary["baseline"] = ensure_baseline(cfg, data, run_dir, meta, explicit)
        warm = str(ckpt)
    stage = "fused" if cfg.model.fused else ("transformer" if warm else "baseline")
    scfg = cfg if warm else replace(cfg, trainer=scratch_trainer(cfg, data))
    summary[stage] = train_stage(scfg, data, run_dir, stage, meta, enc_pad_id, warm, explicit)
    if cfg.model.fused and warm and cfg.warm_start.compare:
        summary["transformer"] = ensure_continued(cfg, data, run_dir, meta, warm, summary["fused"]["steps"], explicit)
        if distributed.is_main():
            summary["equal_budget"] = equal_budget(summary, run_dir, cfg.data.tgt_lang)
    summary["warm_start"] = warm
    summary["final_stage"] = stage
    summary["total_time_s"] = round(time.perf_counter() - start, 1)
    base, fused = summary.get("baseline"), summary.get("fused")
    if base and fused and base.get("mean_epoch_time_s"):
        summary["epoch_time_ratio"] = round(fused["mean_epoch_time_s"] / base["mean_epoch_time_s"], 3)
    last = summary[stage]
    # -- the final model as a folder that bertnmt.load_model() restores without Hydra
    if last.get("checkpoint") and distributed.is_main():
        summary["export"] = str(export_model(last["checkpoint"], run_dir / "export"))
    if "bleu_signature" in last:
        meta["sacrebleu_signature"] = last["bleu_signature"]
        write_json(run_dir / "meta.json", meta)
    write_json(run_dir / "summary.json", summary)
    if distributed.is_main():
        print_summary(summary)
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """The table printed at the end of a run; with ``warm_start.compare`` the equal-budget comparison first."""
    base, plain, fused = summary.get("baseline"), summary.get("transformer"), summary.get("fused")
    rows = [("warm-start baseline", base), ("Transformer (continued)", plain), ("BERT-fused", fused)]
    lines = [f"{'model':<24} {'updates':>7} {'test BLEU':>9} {'chrF':>6} {'epoch s':>8} {'tok/s':>7} {'trainable/total':>22}"]
    for label, s in rows:
        if not s:
            continue
        params = f"{s.get('trainable_params') or 0:,}/{s.get('total_params') or 0:,}"
        steps = s.get("steps")
        lines.append(f"{label:<24} {steps if steps is not None else '?':>7} {s.get('test_bleu', float('nan')):>9.2f} "
                     f"{s.get('test_chrf', float('nan')):>6.2f} {s['mean_epoch_time_s']:>8.1f} {s['tokens_per_s']:>7.0f} "
                     f"{params:>22}")
    eq = summary.get("equal_budget")
    if eq:
        u = eq["updates"]
        lines.append(f"equal budget: BERT-fused and the Transformer both continue the same warm start for "
                     f"{u['fused']:,} / {u['transformer']:,} updates: BLEU {eq['bleu_delta']:+.2f}, chrF {eq['chrf_delta']:+.2f}")
        if "paired_bootstrap" in eq:
            b = eq["paired_bootstrap"]["bleu"]
            lines.append(f"paired bootstrap ({eq['paired_bootstrap']['n_samples']} resamples): p = {b['p_value']:.4f}; "
                         f"95% CI BLEU fused [{b['system_ci'][0]:.2f}, {b['system_ci'][1]:.2f}], "
                         f"Transformer [{b['baseline_ci'][0]:.2f}, {b['baseline_ci'][1]:.2f}]")
    elif base and fused:
        lines.append("not an equal budget: the fused model trained after the baseline's epochs "
                     "(warm_start.compare=true adds the Transformer continued for as many updates)")
    if "epoch_time_ratio" in summary:
        lines.append(f"epoch-time ratio fused / baseline: {summary['epoch_time_ratio']:.2f}")
    last = summary.get(summary.get("final_stage", "")) or fused or plain or base
    if last and "bleu_signature" in last:
        lines.append(f"sacreBLEU: {last['bleu_signature']}")
    lines.append(f"total time {summary['total_time_s']:.0f} s; run directory {summary['run_dir']}")
    return "\n".join(lines)


def print_summary(summary: dict[str, Any]) -> None:
    print(summary_text(summary))
