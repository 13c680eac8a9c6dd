"""One training stage: the loop, its optimiser and schedule, validation and reporting.

Every epoch writes one line to ``results.jsonl`` (and TensorBoard): epoch wall time,
target tokens/s, train/valid loss, valid BLEU, trainable/total parameters (per group, with the
active freeze rules) and peak memory. ``Trainer(..., resume=CKPT)`` continues a stage exactly:
model, optimizer, schedule, epoch, step, freeze position and RNG state come from the checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bertnmt import distributed  # issue 7b: DDP under torchrun; no-ops in one process
from bertnmt.checkpoint import load_checkpoint, load_model_weights, model_weights, save_checkpoint
from bertnmt.config import Config
from bertnmt.data.collate import Batch, make_loader
from bertnmt.data.features import FeatureStore
from bertnmt.data.prepare import PreparedData, Split
from bertnmt.freeze import FreezePolicy
from bertnmt.metrics import corpus_scores
from bertnmt.model.fusion import drop_net_generator
from bertnmt.search import beam_search, greedy_search

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on the CPU (the default there, see docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def inverse_sqrt(warmup: int):
    """fairseq's inverse_sqrt: linear warm-up to the peak lr, then lr * sqrt(warmup / step)."""
    warmup = max(1, warmup)

    def factor(step: int) -> float:
        step += 1
        return min(step / warmup, math.sqrt(warmup / step))

    return factor


def smoothed_loss(logits: torch.Tensor, target: torch.Tensor, pad_id: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross entropy and summed NLL over non-pad tokens.

    ``logits`` (B, T, V) with ``target`` (B, T), or (N, V) with (N,). Equal to
    ``F.cross_entropy(..., label_smoothing=eps, ignore_index=pad_id, reduction="sum")`` and its
    NLL, from one log-softmax instead of two: (1 - eps) * nll + eps / V * sum_c -log p_c.
    """
    V = logits.size(-1)
    lp = F.log_softmax(logits.float().view(-1, V), dim=-1)  # (N, V)
    target = target.reshape(-1)  # (N,)
    keep = target.ne(pad_id)
    if not bool(keep.all()):  # on the trainer's path pads were already removed (Trainer._forward_loss)
        lp, target = lp[keep], target[keep]
    nll = -lp.gather(1, target.unsqueeze(1)).sum()
    loss = nll if eps == 0 else (1.0 - eps) * nll - (eps / V) * lp.sum()
    return loss, nll.detach()


def forward_loss(model: nn.Module, batch: Batch, pad_id: int, eps: float, device: torch.device,
                 use_features: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward: (summed smoothed loss, summed NLL) of a batch.

    The cached H_B in ``batch.bert_feats`` is used when present and ``use_features``; the output
    layer and the softmax run only at non-pad target positions."""
    bert_out = None
    if batch.bert_feats is not None and use_features:
        bert_out = (batch.bert_feats.float(), batch.enc_mask.eq(0))  # (B, E, Hb), (B, E)
    keep = batch.tgt_out.ne(pad_id)  # (B, T)
    with autocast(device):
        logits = model(batch.src, batch.tgt_in, batch.enc_ids, batch.enc_mask, bert_out, keep=keep)  # (N, V)
    return smoothed_loss(logits, batch.tgt_out[keep], pad_id, eps)


@dataclass
class StageResult:
    stage: str
    best_path: Path
    epochs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean_epoch_time(self) -> float:
        times = [e["epoch_time_s"] for e in self.epochs]
        return sum(times) / max(1, len(times))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    if not distributed.is_main():  # issue 7b: rank 0 writes the run's files
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def head(split: Split, n: int) -> Split:
    """The first ``n`` sentences of a split."""
    if n >= len(split.src_ids):
        return split
    enc = split.enc_ids[:n] if split.enc_ids is not None else None
    return replace(split, src_text=split.src_text[:n], tgt_text=split.tgt_text[:n],
                   src_ids=split.src_ids[:n], tgt_ids=split.tgt_ids[:n], enc_ids=enc)


def translate_split(model: nn.Module, data: PreparedData, split: Split, cfg: Config, device: torch.device,
                    beam: int, enc_pad_id: int | None, limit: int = 0,
                    features: FeatureStore | None = None) -> list[str]:
    """Decode a split (greedy when beam == 1) and return detokenised hypotheses in corpus order.

    ``features``: the split's cached H_B (only valid while the encoder has never trained)."""
    model.eval()
    sub = head(split, limit) if limit else split
    n = len(sub.src_ids)
    loader = make_loader(sub, max_tokens=cfg.data.max_tokens, seed=0, shuffle=False, enc_pad_id=enc_pad_id,
                         features=features)
    hyps: list[str] = [""] * n
    ev = cfg.eval
    with torch.inference_mode(), autocast(device):
        for batch in loader:
            batch = batch.to(device)
            for i in range(0, batch.src.size(0), ev.batch_sents):
                sl = slice(i, i + ev.batch_sents)
                enc_ids = batch.enc_ids[sl] if batch.enc_ids is not None else None
                enc_mask = batch.enc_mask[sl] if batch.enc_mask is not None else None
                feats = None
                if batch.bert_feats is not None:
                    feats = (batch.bert_feats[sl].float(), enc_mask.eq(0))  # cached (H_B, pad mask)
                if beam == 1:
                    outs = greedy_search(model, batch.src[sl], enc_ids, enc_mask, ev.max_len_a, ev.max_len_b,
                                         bert_out=feats)
                else:
                    nbest = beam_search(model, batch.src[sl], enc_ids, enc_mask, beam, ev.lenpen, ev.max_len_a,
                                        ev.max_len_b, bert_out=feats)
                    outs = [h[0][0] for h in nbest]
                for idx, ids in zip(batch.indices[sl].tolist(), outs):
                    hyps[idx] = data.vocab.decode(ids)
    return hyps


def rng_state() -> dict[str, Any]:
    """Torch's RNG state (dropout, drop-net): uint8 tensors, fine for ``weights_only`` loading."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if (gen := drop_net_generator()) is not None:  # issue 7b: drop-net's own generator under DDP
        state["drop_net"] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "drop_net" in state and (gen := drop_net_generator()) is not None:  # issue 7b
        gen.set_state(state["drop_net"])


class Trainer:
    """Trains one stage (``baseline`` or ``fused``) of the recipe in ``run_dir``.

    The freeze policy is applied at each epoch start and, with ``freeze.unit=step``, before every
    optimizer update; the lr of each parameter is the inverse-sqrt schedule times its policy multiplier.
    """

    def __init__(self, cfg: Config, model: nn.Module, data: PreparedData, policy: FreezePolicy,
                 run_dir: Path, stage: str, meta: dict[str, Any], enc_pad_id: int | None = None,
                 resume: str | Path | None = None, features: dict[str, FeatureStore] | None = None) -> None:
        self.cfg, self.model, self.data, self.policy = cfg, model, data, policy
        self.run_dir, self.stage, self.meta = Path(run_dir), stage, meta
        self.device = pick_device(cfg.trainer.device)
        self.model.to(self.device)
        self.policy.apply(self.model, epoch=1, step=0)
        groups = self.policy.param_groups(self.model, cfg.optim)  # every parameter, one group each
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, inverse_sqrt(o.warmup_steps))
        self.enc_pad_id = enc_pad = enc_pad_id if model_uses_bert(model) else None
        feats = features if enc_pad is not None and features else {}
        self.train_loader = make_loader(data.splits["train"], cfg.data.max_tokens, cfg.trainer.seed, True, enc_pad,
                                        pin_memory=self.device.type == "cuda", features=feats.get("train"))
        self.valid_loader = make_loader(data.splits["valid"], cfg.data.max_tokens, 0, False, enc_pad,
                                        features=feats.get("valid"))
        self.features: dict[str, FeatureStore] = dict(feats)  # cleared for good once the encoder trains
        distributed.shard(self.train_loader.batch_sampler)  # issue 7b: rank r takes batches r, r+N, ...
        self.replicas = distributed.Replicas(self.model, self.device, cfg.trainer.seed)  # issue 7b: the DDP wrapper
        self.step = 0
        self.start_epoch = 1
        self.best = -math.inf
        self.results = self.run_dir / "results.jsonl"
        self.ckpt_dir = self.run_dir / "checkpoints" / stage
        self.writer = None
        if cfg.trainer.tensorboard and distributed.is_main():  # issue 7b: rank 0 only
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb" / stage))
        if resume is not None:
            self.resume(resume)
        self._check_features()

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint of this stage: weights, optimizer, schedule, epoch, step, freeze position, RNG."""
        ckpt = load_checkpoint(path)
        load_model_weights(self.model, ckpt["model"], str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.start_epoch = int(ckpt["step"]), int(ckpt["epoch"]) + 1
        self.best = float(ckpt.get("best_metric", ckpt.get("metric", -math.inf)))
        self.policy.load_state_dict(ckpt.get("freeze", {}))
        set_rng_state(ckpt.get("rng", {}))
        log.info("[%s] resumed from %s at epoch %d, step %d", self.stage, path, self.start_epoch, self.step)

    def _check_features(self) -> None:
        """Stop serving cached H_B, for the rest of the run, once the policy lets any part of the encoder train."""
        if self.features and not self.policy.encoder_untrained(self.model):
            self.features = {}
            for loader in (self.train_loader, self.valid_loader):
                loader.dataset.features = None
            log.info("[%s] feature cache off from epoch %d step %d: the pretrained encoder trains; H_B is computed live",
                     self.stage, self.policy.epoch, self.step)

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
        model = self.replicas.forward_model()  # issue 7b: DDP for training forwards, else self.model
        return forward_loss(model, batch, self.data.vocab.pad_id, self.cfg.optim.label_smoothing, self.device,
                            use_features=bool(self.features))  # cached H_B, never once the encoder trains

    def train_epoch(self, epoch: int) -> dict[str, float]:
        t = self.cfg.trainer
        self.model.train()
        self._sync_policy(epoch, at_epoch_start=True)  # after train(): fully frozen modules go back to eval
        per_step = self.policy.unit == "step"
        self.train_loader.batch_sampler.set_epoch(epoch)
        tot_loss = torch.zeros((), device=self.device)  # summed on the device: no host sync per step
        tot_tokens = 0
        accum: list[Batch] = []
        start = time.perf_counter()
        bar = None
        if t.progress and distributed.is_main():  # issue 7b
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.train_loader), desc=f"{self.stage} epoch {epoch}", leave=False, dynamic_ncols=True)
        for batch in self.train_loader:
            accum.append(batch.to(self.device, non_blocking=True))
            if len(accum) < t.accum_steps:
                continue
            ntok = sum(b.ntokens for b in accum)
            norm = self.replicas.begin_update(ntok, len(accum))  # issue 7b: all ranks' tokens / N (= ntok in one process)
            if per_step:
                self._sync_policy(epoch)  # requires_grad for this update, before its forward passes
            for b in accum:
                loss, _ = self._forward_loss(b)
                (loss / norm).backward()
                tot_loss += loss.detach()
            tot_tokens += ntok
            if self.cfg.optim.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_norm)
            self.policy.scale_lrs(self.optimizer, self.scheduler.get_last_lr())  # inverse sqrt x policy multiplier
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)  # frozen weights keep grad None (pitfall 2)
            self.step += 1
            self.policy.step = self.step  # the policy's position: the index of the next update
            accum = []
            if bar is not None:
                bar.update(t.accum_steps)
            if self.step % t.log_every == 0:  # the only host syncs of the loop
                avg = tot_loss.item() / max(1, tot_tokens)
                if bar is not None:
                    bar.set_postfix(loss=f"{avg:.3f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", avg, self.step)
                    self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
            if t.max_steps and self.step >= t.max_steps:
                break
        if bar is not None:
            bar.close()
        tot_loss, tot_tokens = distributed.sum_over_ranks(tot_loss, tot_tokens)  # issue 7b: the whole epoch's figures
        elapsed = time.perf_counter() - start
        return {"train_loss": tot_loss.item() / max(1, tot_tokens), "epoch_time_s": elapsed,
                "train_tokens": int(tot_tokens), "tokens_per_s": tot_tokens / max(elapsed, 1e-9)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        loss_sum = nll_sum = ntok = 0.0
        for batch in self.valid_loader:
            batch = batch.to(self.device)
            loss, nll = self._forward_loss(batch)
            loss_sum += loss.item()
            nll_sum += nll.item()
            ntok += batch.ntokens
        out = {"valid_loss": loss_sum / ntok, "valid_nll": nll_sum / ntok, "valid_ppl": math.exp(min(nll_sum / ntok, 50))}
        if self.cfg.trainer.valid_bleu:
            split = self.data.splits["valid"]
            limit = self.cfg.trainer.valid_max_sents
            hyps = translate_split(self.model, self.data, split, self.cfg, self.device, 1, self.enc_pad_id, limit,
                                   features=self.features.get("valid"))
            score = corpus_scores(hyps, split.tgt_text[: len(hyps)], self.cfg.data.tgt_lang)
            out["valid_bleu"] = score.bleu
        return out

    # -- the stage ---------------------------------------------------------------------------
    def fit(self) -> StageResult:
        t = self.cfg.trainer
        result = StageResult(self.stage, self.ckpt_dir / "checkpoint_best.pt")
        for epoch in range(self.start_epoch, t.max_epochs + 1):
            if t.max_steps and self.step >= t.max_steps:
                break
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            tr = self.train_epoch(epoch)
            va = self.validate()
            rec = {"stage": self.stage, "epoch": epoch, "step": self.step, **tr, **va,
                   "lr": self.scheduler.get_last_lr()[0], "peak_mem_mb": round(peak_memory_mb(self.device), 1),
                   **self.policy.report(self.model)}
            result.epochs.append(rec)
            append_jsonl(self.results, rec)
            self._log_epoch(rec)
            metric = va.get("valid_bleu", -va["valid_loss"])
            improved = metric > self.best
            self.best = max(self.best, metric)
            payload = self._payload(epoch, metric)
            save_checkpoint(self.ckpt_dir / "checkpoint_last.pt", payload)
            if improved:
                save_checkpoint(result.best_path, payload)
            if t.max_steps and self.step >= t.max_steps:
                break
        if self.writer is not None:
            self.writer.close()
        distributed.barrier()  # issue 7b: rank 0's checkpoints exist before any rank loads them
        return result

    def _payload(self, epoch: int, metric: float) -> dict[str, Any]:
        return {
            # the pretrained encoder is stored only when the policy ever trains part of it
            "model": model_weights(self.model, include_bert=self.policy.may_train(self.model, "bert.")),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch, "step": self.step, "metric": float(metric), "best_metric": float(self.best),
            "freeze": self.policy.state_dict(), "rng": rng_state(), "meta": self.meta,
        }

    def _log_epoch(self, rec: dict[str, Any]) -> None:
        bleu = f" valid BLEU {rec['valid_bleu']:.2f} |" if "valid_bleu" in rec else ""
        log.info(
            "[%s] epoch %d | %.1f s | %.0f tok/s | train loss %.3f | valid loss %.3f ppl %.2f |%s trainable %s/%s | peak mem %.0f MB",
            self.stage, rec["epoch"], rec["epoch_time_s"], rec["tokens_per_s"], rec["train_loss"], rec["valid_loss"],
            rec["valid_ppl"], bleu, f"{rec['trainable_params']:,}", f"{rec['total_params']:,}", rec["peak_mem_mb"],
        )
        if self.writer is not None:
            for k in ("train_loss", "valid_loss", "valid_ppl", "valid_bleu", "tokens_per_s", "epoch_time_s", "peak_mem_mb"):
                if k in rec:
                    self.writer.add_scalar(f"epoch/{k}", rec[k], rec["epoch"])


def model_uses_bert(model: nn.Module) -> bool:
    return getattr(model, "bert", None) is not None


def load_best(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a stage's best weights into ``model`` (the pretrained encoder may be absent from the file)."""
    ckpt = load_checkpoint(path)
    load_model_weights(model, ckpt["model"], str(path))
    return ckpt
