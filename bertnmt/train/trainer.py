"""One training stage: the loop, its optimiser and schedule, validation and reporting.

Every epoch writes one line to ``results.jsonl`` (and TensorBoard): epoch wall time,
target tokens/s, train/valid loss, valid BLEU, trainable/total parameters (per group, with the
active freeze rules), peak memory and the updates skipped for a non-finite loss or out of memory.

``Trainer(..., resume=CKPT or FOLDER)`` continues a stage exactly, also from the middle of an
epoch: model, optimizer, schedule, epoch, step, the position inside the epoch (the same remaining
batches in the same order), freeze position, running loss sums and every RNG come from the
checkpoint (see :mod:`bertnmt.train.checkpoint` for the files, :mod:`bertnmt.train.faults` for signals and skips).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bertnmt.core.config import Config, Unit
from bertnmt.core.devices import peak_memory_mb, pick_device
from bertnmt.core.errors import CheckpointError, ConfigError, TrainingInterrupted
from bertnmt.data.collate import Batch, make_loader
from bertnmt.data.features import FeatureStore
from bertnmt.data.prepare import PreparedData
from bertnmt.decoding.loop import decode_split, options_from_eval
from bertnmt.decoding.metrics import corpus_scores
from bertnmt.model.fusion import seed_drop_net, set_drop_net_on_device
from bertnmt.train import distributed  # DDP under torchrun; no-ops in one process
from bertnmt.train.checkpoint import (
    BEST,
    LAST,
    latest_checkpoint,
    link_checkpoint,
    load_checkpoint,
    load_model_weights,
    model_weights,
    remove_temp_files,
    restore_old_drop_net,
    rng_state,
    rotate,
    save_checkpoint,
    set_rng_state,
    step_checkpoint,
)
from bertnmt.train.early_stop import best_epoch, check_early_stop, early_stop_epoch, monitored
from bertnmt.train.faults import StopSignal, UpdateGuard
from bertnmt.train.freeze import FreezePolicy
from bertnmt.train.loss import compile_loss, forward_loss
from bertnmt.train.optim import inverse_sqrt, load_optimizer_state, make_optimizer, optimizer_state
from bertnmt.train.results import append_jsonl, keep_until

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    stage: str
    best_path: Path
    epochs: list[dict[str, Any]] = field(default_factory=list)
    stop: str = "max_epochs"  # why training ended: max_epochs | max_steps | early_stop

    @property
    def mean_epoch_time(self) -> float:
        times = [e["epoch_time_s"] for e in self.epochs]
        return sum(times) / max(1, len(times))


@dataclass
class EpochPosition:
    """Where training is inside an epoch, saved in every checkpoint (running sums included)."""

    epoch_done: bool = False
    batches_done: int = 0  # batches drawn from this epoch's sampler (skipped ones included)
    n_batches: int = 0  # the epoch's batch count (a check that the data did not change)
    tot_loss: float = 0.0
    tot_tokens: float = 0.0
    elapsed_s: float = 0.0  # training time of this epoch so far


class Trainer:
    """Trains one stage (``baseline`` or ``fused``) of the recipe in ``run_dir``.

    The freeze policy is applied at each epoch start and, with ``freeze.unit=step``, before every
    optimizer update; the lr of each parameter is the inverse-sqrt schedule times its policy multiplier.
    ``resume``: a checkpoint file, or a stage's checkpoint folder (its newest readable checkpoint; none: start).
    Checkpoints and ``results.jsonl`` are written only by :meth:`_save` and :meth:`_record`.
    """

    def __init__(self, cfg: Config, model: nn.Module, data: PreparedData, policy: FreezePolicy,
                 run_dir: Path, stage: str, meta: dict[str, Any], bert_pad_id: int | None = None,
                 resume: str | Path | None = None, features: dict[str, FeatureStore] | None = None) -> None:
        self.cfg, self.model, self.data, self.policy = cfg, model, data, policy
        self.run_dir, self.stage, self.meta = Path(run_dir), stage, meta
        self.device = pick_device(cfg.trainer.device)
        if cfg.trainer.valid_bleu_every < 1:
            raise ConfigError(f"trainer.valid_bleu_every={cfg.trainer.valid_bleu_every} must be at least 1")
        check_early_stop(cfg.trainer.early_stop, cfg.trainer.valid_bleu, cfg.trainer.valid_bleu_every)
        self.model.to(self.device)
        # The training forward and its loss; compiled, they are one graph (AOTAutograd compiles its backward as
        # another) over the model's own parameters, so state dicts are unchanged. Drop-net is then drawn on the
        # device (no data-dependent branch).
        set_drop_net_on_device(model, cfg.trainer.compile)
        self.loss_fn = compile_loss(cfg.trainer.compile_mode) if cfg.trainer.compile else forward_loss
        self.policy.apply(self.model, epoch=1, step=0)
        o = cfg.optim
        self.optimizer = make_optimizer(self.policy, self.model, o, self.device)  # one group per freeze class
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, inverse_sqrt(o.warmup_steps))
        # running sums of an epoch on the device, (loss, target tokens) float64: read once per log interval
        self._sums: torch.Tensor | None = None
        self.bert_pad_id = enc_pad = bert_pad_id if model_uses_bert(model) else None
        feats = features if enc_pad is not None and features else {}
        self.pad_multiple = pad8 = resolve_pad_multiple(cfg.data.pad_multiple, self.device, cfg.trainer.compile)
        self.train_loader = make_loader(data.splits["train"], cfg.data.max_tokens, cfg.trainer.seed, True, enc_pad,
                                        pin_memory=self.device.type == "cuda", features=feats.get("train"),
                                        pad_multiple=pad8)
        self.valid_loader = make_loader(data.splits["valid"], cfg.data.max_tokens, 0, False, enc_pad,
                                        features=feats.get("valid"), pad_multiple=pad8)
        self.features: dict[str, FeatureStore] = dict(feats)  # cleared for good once the encoder trains
        distributed.shard(self.train_loader.batch_sampler)  # rank r takes batches r, r+N, ...
        seed_drop_net(model, cfg.trainer.seed)  # host-side draws: the same on every rank; in the model's state dict
        self.replicas = distributed.Replicas(self.model, self.device)  # the DDP wrapper
        self.step = 0
        self.start_epoch = 1
        self.best = -math.inf
        self.results = self.run_dir / "results.jsonl"
        self.ckpt_dir = self.run_dir / "checkpoints" / stage
        self.writer = None
        self.guard = UpdateGuard(stage, cfg.trainer.max_nonfinite_in_row)
        self.stop = StopSignal()
        self.past_epochs: list[dict[str, Any]] = []  # this stage's records from before a resume
        self.resumed_from: Path | None = None
        self._resume_pos: EpochPosition | None = None  # a checkpoint taken inside an epoch
        self._resume_rng: dict[str, Any] | None = None  # restored where the original run was at that point
        if resume is not None:
            self.resume(resume)
        self._check_features()

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint of this stage (or the newest readable one in a folder): weights, optimizer,
        schedule, epoch, step, position inside the epoch, freeze position, running sums and RNG."""
        path = Path(path)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                return
            path, ckpt = found
        else:
            ckpt = load_checkpoint(path)
        if ckpt.get("stage", self.stage) != self.stage:
            raise CheckpointError(f"checkpoint {path} belongs to the {ckpt['stage']!r} stage, not {self.stage!r}")
        theirs, ours = (ckpt.get("meta") or {}).get("vocab_sha256"), self.data.vocab.sha256
        if theirs and theirs != ours:
            raise CheckpointError(f"checkpoint {path} was trained with another vocabulary (SentencePiece sha256 "
                                  f"{theirs[:12]} vs {ours[:12]} of {self.data.vocab.path}): the data changed; restore "
                                  "it, or start afresh with trainer.resume=never")
        load_model_weights(self.model, ckpt["model"], str(path))  # drop-net's generator state included
        restore_old_drop_net(self.model, ckpt)
        load_optimizer_state(self.optimizer, ckpt["optimizer"], str(path))
        self._load_scheduler(ckpt["scheduler"])
        epoch = int(ckpt["epoch"])
        pos = EpochPosition(**{"epoch_done": True, **ckpt.get("position", {})})
        self.step = int(ckpt["step"])
        self.start_epoch = epoch + 1 if pos.epoch_done else epoch
        self._resume_pos = None if pos.epoch_done else pos
        self.guard.load_state_dict(ckpt.get("guard", {}))
        self.best = float(ckpt.get("best_metric", ckpt.get("metric", -math.inf)))
        self.policy.load_state_dict(ckpt.get("freeze", {}))
        self._resume_rng = ckpt.get("rng", {})
        seed = ckpt.get("sampler", {}).get("seed", self.cfg.trainer.seed)
        if seed != self.cfg.trainer.seed:
            log.warning("[%s] %s was trained with trainer.seed=%s, now %s: the data order differs from here on",
                        self.stage, path, seed, self.cfg.trainer.seed)
        self.resumed_from = path
        if distributed.is_main():  # rank 0 owns the run's files
            self.past_epochs = keep_until(self.results, self.stage, epoch if pos.epoch_done else epoch - 1)
            remove_temp_files(self.ckpt_dir)
        where = "end" if pos.epoch_done else f"batch {pos.batches_done}/{pos.n_batches}"
        log.info("[%s] resumed from %s: epoch %d (%s), step %d", self.stage, path, epoch, where, self.step)

    def _load_scheduler(self, state: dict[str, Any]) -> None:
        """The schedule's position; its per-group lists follow this optimizer's groups (all groups share one
        base lr; the policy's multipliers are applied before each step)."""
        state = dict(state)
        n = len(self.optimizer.param_groups)
        for key in ("base_lrs", "_last_lr"):
            if key in state and len(state[key]) != n:
                state[key] = [state[key][0]] * n
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    def _check_features(self) -> None:
        """Stop serving cached H_B, for the rest of the run, once the policy lets any part of the encoder train."""
        if self.features and not self.policy.encoder_untrained(self.model):
            self.features = {}
            for loader in (self.train_loader, self.valid_loader):
                loader.dataset.features = None
            log.info("[%s] feature cache off from epoch %d step %d: the pretrained encoder trains; "
                     "H_B is computed live", self.stage, self.policy.epoch, self.step)

    def _sync_policy(self, epoch: int, at_epoch_start: bool = False) -> None:
        """Apply the freeze policy at (epoch, step); log per-group counts at each epoch start and each switch."""
        switched = self.policy.apply(self.model, epoch=epoch, step=self.step)
        if switched:
            self._check_features()
        if switched or at_epoch_start:
            rep = self.policy.report(self.model)
            groups = " ".join(f"{g} {c['trainable']:,}/{c['total']:,}" for g, c in rep["params_by_group"].items())
            log.info("[%s] epoch %d step %d%s | trainable %s/%s | %s | rules: %s", self.stage, epoch, self.step,
                     " | freeze switch" if switched else "", f"{rep['trainable_params']:,}", f"{rep['total_params']:,}",
                     groups, "; ".join(rep["active_rules"]) or "-")

    # -- one epoch ---------------------------------------------------------------------------
    def _forward_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.replicas.forward_model()  # the DDP wrapper for training forwards under torchrun
        loss_fn = self.loss_fn if model is self.model else forward_loss  # (torch.compile'd in one process)
        return loss_fn(model, batch, self.data.vocab.pad_id, self.cfg.optim.label_smoothing, self.device,
                       use_features=bool(self.features),  # cached H_B, never once the encoder trains
                       precision=self.cfg.trainer.precision)

    def _update(self, accum: list[Batch], epoch: int, pos: EpochPosition) -> bool:
        """One optimizer update over ``accum``; False when its batch ran out of memory (skipped).

        Nothing here waits for the device: the losses are summed on it (read by :meth:`_settle`), and a
        non-finite loss or gradient norm skips the update there, through the fused optimizer's
        ``found_inf`` (weights and optimizer state unchanged; the step count and schedule advance)."""
        ntok = sum(b.ntokens for b in accum)
        if self._sums is None:  # an update outside train_epoch (benchmarks, tests)
            self._start_sums(pos)
        if self.policy.unit == Unit.step:
            self._sync_policy(epoch)  # requires_grad for this update, before its forward passes
        norm = self.replicas.begin_update(ntok, len(accum))  # all ranks' tokens / N (= ntok in one process)
        loss_sum, oom = None, False
        try:
            for b in accum:
                loss, _ = self._forward_loss(b)
                (loss / norm).backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()  # () float32
        except torch.cuda.OutOfMemoryError:
            oom = True  # handled outside the except block, so that the failed batch's tensors can be freed
        if oom:
            self.guard.skip_oom(epoch, self.step, ntok, self.optimizer, self.device)
            return False
        bad = ~torch.isfinite(loss_sum)  # () bool
        if self.cfg.optim.clip_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_norm)
            bad = bad | ~torch.isfinite(gnorm)
        bad = distributed.any_rank(bad)  # every rank skips alike
        self.policy.scale_lrs(self.optimizer, self.scheduler.get_last_lr())  # inverse sqrt x policy multiplier
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = bad.float()  # the fused kernel skips the whole update when it is 1
            self.optimizer.step()
        elif not bool(bad):  # a device without the fused kernel: the one host sync of the update
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # frozen weights keep grad None
        self.guard.track(bad, self.step)
        good = (~bad).double()
        self._sums = self._sums + torch.stack([torch.where(bad, 0.0, loss_sum.double()), good * ntok])  # (2,)
        self.step += 1
        self.policy.step = self.step  # the policy's position: the index of the next update
        return True

    def _start_sums(self, pos: EpochPosition) -> None:
        """Continue the epoch's running sums and skip counts on the device from ``pos`` and the guard."""
        self._sums = torch.tensor([pos.tot_loss, pos.tot_tokens], dtype=torch.float64, device=self.device)
        self.guard.start_counting(self.device)

    def _settle(self, pos: EpochPosition, epoch: int) -> None:
        """Read the device's running sums and skip counts into ``pos`` and the guard (one host sync)."""
        vals = torch.cat([self._sums, self.guard.counters()]).tolist()
        pos.tot_loss, pos.tot_tokens = vals[0], vals[1]
        self.guard.settle(vals[2:], epoch, self.step)  # raises after too many non-finite updates in a row
        self._start_sums(pos)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t = self.cfg.trainer
        self.model.train()
        self._sync_policy(epoch, at_epoch_start=True)  # after train(): fully frozen modules go back to eval
        sampler = self.train_loader.batch_sampler
        pos, self._resume_pos = self._resume_pos or EpochPosition(), None
        if pos.batches_done == 0:
            self.guard.new_epoch()
        sampler.set_epoch(epoch, skip=pos.batches_done)
        n_batches = len(sampler.batches())
        if pos.n_batches and pos.n_batches != n_batches:
            raise CheckpointError(f"{self.resumed_from} was saved in an epoch of {pos.n_batches} batches, but "
                                  f"this data gives {n_batches}: data or data.max_tokens changed; resume with the "
                                  "same settings")
        pos.n_batches = n_batches
        batches = iter(self.train_loader)  # creating it draws from torch's RNG
        if self._resume_rng is not None:  # restore after that draw: the original run made it before its checkpoint
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        accum: list[Batch] = []
        self._start_sums(pos)
        start = time.perf_counter() - pos.elapsed_s
        bar = None
        if t.progress and distributed.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=n_batches, initial=pos.batches_done, desc=f"{self.stage} epoch {epoch}", leave=False,
                       dynamic_ncols=True)
        for batch in batches:
            if t.max_steps and self.step >= t.max_steps:
                break
            pos.batches_done += 1
            accum.append(batch.to(self.device, non_blocking=True))
            if len(accum) < t.accum_steps:
                continue
            stepped = self._update(accum, epoch, pos)
            accum = []
            saving = stepped and t.save_every_steps and self.step % t.save_every_steps == 0
            if saving or self.stop.requested or (stepped and self.step % t.log_every == 0):
                self._settle(pos, epoch)
            if bar is not None:
                bar.update(t.accum_steps)
                if pos.tot_tokens:  # the running loss is read from the device once per log interval
                    bar.set_postfix(loss=f"{pos.tot_loss / pos.tot_tokens:.3f}")
            if stepped and self.writer is not None and self.step % t.log_every == 0:
                self.writer.add_scalar("train/loss", pos.tot_loss / max(1, pos.tot_tokens), self.step)
                self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
            saved = None
            if saving:
                pos.elapsed_s = time.perf_counter() - start
                saved = self._save(epoch, pos)
            if self.stop.requested:
                pos.elapsed_s = time.perf_counter() - start
                saved = saved or self._save(epoch, pos)
                raise TrainingInterrupted(self.stop.signum, self.step, str(saved))
        if bar is not None:
            bar.close()
        self._settle(pos, epoch)
        loss_all, tok_all = distributed.sum_over_ranks(  # the whole epoch's figures, all ranks
            torch.tensor(pos.tot_loss, dtype=torch.float64, device=self.device), int(pos.tot_tokens))
        elapsed = time.perf_counter() - start
        return {"train_loss": float(loss_all) / max(1, tok_all), "epoch_time_s": elapsed,
                "train_tokens": int(tok_all), "tokens_per_s": tok_all / max(elapsed, 1e-9),
                "skipped_nonfinite": self.guard.nonfinite, "skipped_oom": self.guard.oom}

    @torch.no_grad()
    def validate(self, bleu: bool | None = None) -> dict[str, float]:
        """Validation loss and perplexity; with ``bleu`` (default: ``trainer.valid_bleu``), greedy BLEU on the
        first ``trainer.valid_max_sents`` sentences, their number as ``valid_bleu_sents``."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss, NLL), read once at the end
        ntok = 0
        for batch in self.valid_loader:
            batch = batch.to(self.device)
            loss, nll = self._forward_loss(batch)
            sums += torch.stack([loss.double(), nll.double()])
            ntok += batch.ntokens
        loss_sum, nll_sum = sums.tolist()
        out = {"valid_loss": loss_sum / ntok, "valid_nll": nll_sum / ntok,
               "valid_ppl": math.exp(min(nll_sum / ntok, 50))}
        if self.cfg.trainer.valid_bleu if bleu is None else bleu:
            split = self.data.splits["valid"]
            opts = options_from_eval(self.cfg.eval, beam=1, precision=self.cfg.trainer.precision)
            hyps = decode_split(self.model, split, self.data.vocab, opts, self.device, self.bert_pad_id,
                                self.features.get("valid"), limit=self.cfg.trainer.valid_max_sents)
            score = corpus_scores(hyps, split.tgt_text[: len(hyps)], self.cfg.data.tgt_lang)
            out["valid_bleu"] = score.bleu
            out["valid_bleu_sents"] = len(hyps)  # the subset the figure is computed on
        return out

    # -- the stage ---------------------------------------------------------------------------
    def fit(self) -> StageResult:
        """Train the remaining epochs. SIGTERM / SIGINT: checkpoint at the next step boundary, then
        :class:`TrainingInterrupted`."""
        t = self.cfg.trainer
        result = StageResult(self.stage, self.ckpt_dir / BEST, list(self.past_epochs))
        if self._resume_pos is None and self._resume_rng is not None:  # resumed at an epoch end
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        if t.tensorboard and self.writer is None and distributed.is_main():  # rank 0 only
            from torch.utils.tensorboard import SummaryWriter

            # a resumed stage drops the events logged after its checkpoint
            self.writer = SummaryWriter(str(self.run_dir / "tb" / self.stage),
                                        purge_step=self.step if self.resumed_from else None)
        try:
            with self.stop:
                for epoch in range(self.start_epoch, t.max_epochs + 1):
                    if self._stops_early(result):  # also when resumed after the deciding epoch
                        break
                    if t.max_steps and self.step >= t.max_steps and self._resume_pos is None:
                        result.stop = "max_steps"
                        break
                    self._run_epoch(epoch, result)
                    if self.stop.requested:
                        raise TrainingInterrupted(self.stop.signum, self.step, str(self.ckpt_dir / LAST))
                    if t.max_steps and self.step >= t.max_steps:
                        result.stop = "max_steps"
                        break
                else:
                    self._stops_early(result)  # the cap was reached: was the last epoch also the stopping one?
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        distributed.barrier()  # rank 0's checkpoints exist before any rank loads them
        return result

    def _stops_early(self, result: StageResult) -> bool:
        es = self.cfg.trainer.early_stop
        at = early_stop_epoch(result.epochs, es)
        if at is None:
            return False
        if result.stop != "early_stop":
            log.info("[%s] early stop after epoch %d: valid %s has not improved by more than %g for %d epoch(s); "
                     "best epoch %s", self.stage, at, es.metric, es.min_delta, es.patience,
                     best_epoch(result.epochs, es))
        result.stop = "early_stop"
        return True

    def _run_epoch(self, epoch: int, result: StageResult) -> None:
        """Train, validate, record and checkpoint one epoch."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        tr = self.train_epoch(epoch)
        va = self.validate(bleu=self._bleu_due(epoch))
        rec = {"stage": self.stage, "epoch": epoch, "step": self.step, **tr, **va,
               "lr": self.scheduler.get_last_lr()[0], "peak_mem_mb": round(peak_memory_mb(self.device), 1),
               **self.policy.report(self.model)}
        result.epochs.append(rec)
        self._record(rec)
        self._log_epoch(rec)
        es = self.cfg.trainer.early_stop
        if es.patience:  # the best checkpoint follows the early-stopping metric
            metric = monitored(rec, es.metric)
        else:  # with valid BLEU on, only the epochs that computed it compete for the best checkpoint
            metric = va.get("valid_bleu", math.nan) if self.cfg.trainer.valid_bleu else -va["valid_loss"]
        improved = metric > self.best  # False for nan
        self.best = max(self.best, metric) if improved else self.best
        self._save(epoch, EpochPosition(epoch_done=True), metric, best=improved)

    def _bleu_due(self, epoch: int) -> bool:
        """Valid BLEU after this epoch: every ``trainer.valid_bleu_every`` epochs and after the stage's last."""
        t = self.cfg.trainer
        if not t.valid_bleu:
            return False
        last = epoch >= t.max_epochs or bool(t.max_steps and self.step >= t.max_steps)
        return last or epoch % t.valid_bleu_every == 0

    def _save(self, epoch: int, pos: EpochPosition, metric: float = math.nan, best: bool = False) -> Path:
        """The one place that writes checkpoints: a step checkpoint (+ ``checkpoint_last.pt``, rotation),
        or at an epoch end ``checkpoint_last.pt`` (+ ``checkpoint_best.pt``). Returns the file written."""
        last = self.ckpt_dir / LAST
        if not distributed.is_main():  # rank 0 writes (and rotates) the checkpoints
            return last
        payload = self._payload(epoch, pos, metric)
        if pos.epoch_done:
            save_checkpoint(last, payload)
            if best:
                link_checkpoint(last, self.ckpt_dir / BEST)
            return last
        path = step_checkpoint(self.ckpt_dir, epoch, self.step)
        save_checkpoint(path, payload)
        link_checkpoint(path, last)
        rotate(self.ckpt_dir, self.cfg.trainer.keep_last)
        return path

    def _record(self, rec: dict[str, Any]) -> None:
        """The one place that appends to ``results.jsonl``."""
        append_jsonl(self.results, rec)

    def _payload(self, epoch: int, pos: EpochPosition, metric: float) -> dict[str, Any]:
        return {
            "stage": self.stage,
            # the pretrained encoder is stored only when the policy ever trains part of it
            "model": model_weights(self.model, include_bert=self.policy.may_train(self.model, "bert.")),
            "optimizer": optimizer_state(self.optimizer),  # by parameter name: loads under any grouping
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch, "step": self.step, "metric": float(metric), "best_metric": float(self.best),
            "position": asdict(pos), "guard": self.guard.state_dict(),
            "sampler": {"seed": self.cfg.trainer.seed, "epoch": epoch},
            "freeze": self.policy.state_dict(), "rng": rng_state(), "meta": self.meta,
        }

    def _log_epoch(self, rec: dict[str, Any]) -> None:
        bleu = (f" valid BLEU {rec['valid_bleu']:.2f} ({rec['valid_bleu_sents']} sentences) |"
                if "valid_bleu" in rec else "")
        skipped = (f" | skipped: {rec['skipped_nonfinite']} non-finite, {rec['skipped_oom']} out of memory"
                   if rec["skipped_nonfinite"] or rec["skipped_oom"] else "")
        log.info(
            "[%s] epoch %d | %.1f s | %.0f tok/s | train loss %.3f | valid loss %.3f ppl %.2f |%s trainable %s/%s "
            "| peak mem %.0f MB%s",
            self.stage, rec["epoch"], rec["epoch_time_s"], rec["tokens_per_s"], rec["train_loss"], rec["valid_loss"],
            rec["valid_ppl"], bleu, f"{rec['trainable_params']:,}", f"{rec['total_params']:,}", rec["peak_mem_mb"],
            skipped,
        )
        if self.writer is not None:
            for k in ("train_loss", "valid_loss", "valid_ppl", "valid_bleu", "tokens_per_s", "epoch_time_s",
                      "peak_mem_mb"):
                if k in rec:
                    self.writer.add_scalar(f"epoch/{k}", rec[k], rec["epoch"])


def resolve_pad_multiple(pad_multiple: int, device: torch.device, compile: bool) -> int:
    """``data.pad_multiple``, with 0 (auto) = 8 where static shapes pay (CUDA, torch.compile), else 1."""
    if pad_multiple > 0:
        return pad_multiple
    return 8 if device.type == "cuda" or compile else 1


def model_uses_bert(model: nn.Module) -> bool:
    return getattr(model, "bert", None) is not None


def load_best(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a stage's best weights into ``model`` (the pretrained encoder may be absent from the file)."""
    ckpt = load_checkpoint(path)
    load_model_weights(model, ckpt["model"], str(path))
    return ckpt
