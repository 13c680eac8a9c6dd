"""Side-by-side speed and memory figures (``scripts/bench.py``, docs/benchmarks.md).

One run measures, on the same data, dimensions and batches:

1. training step time (and the epoch time it implies) of the plain Transformer, the fused model with
   the frozen encoder cached / run live, and with the encoder fine-tuned, against the compute floor
   counted from the dimensions (:mod:`bertnmt.experiments.flops`);
2. peak memory of each (CUDA max allocated, or peak RSS on the CPU);
3. beam-search decoding, sentences/s, plain against fused;
4. our plain Transformer against Hugging Face's ``MarianMTModel`` of identical dimensions
   (training on the same batches; ``generate`` with the same beam and output length);
5. on CUDA: tokens/s, model FLOPs utilisation against the device's bf16 peak, and peak memory.

Every variant runs in its own process (``python -m bertnmt.experiments.bench --worker ...``), so each peak
memory figure is that variant's alone; the variants run one after another in one invocation.
Models are randomly initialised (speed does not depend on the weights); decoding is forced to a
fixed output length so that every decoder does the same number of steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bertnmt.core.devices import autocast, peak_memory_mb
from bertnmt.core.host_memory import child_env, tune_host_memory
from bertnmt.core.paths import PROJECT_ROOT
from bertnmt.experiments.bench_report import device_name, report
from bertnmt.experiments.bench_spec import DECODE_VARIANTS, TRAIN_VARIANTS, BenchSpec, compose_cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(spec: BenchSpec, device: torch.device):
    return autocast(device, "bf16" if spec.bf16 else "auto")  # the Trainer's: bf16 on CUDA, fp32 on the CPU


def _setup(spec: BenchSpec, variant: str):
    """Data (with encoder ids), the fused or plain model, its policy and cached features, the device."""
    from bertnmt.core.config import FeatureCache, Policy
    from bertnmt.data.features import feature_cache
    from bertnmt.data.prepare import add_encoder_view, prepare_data
    from bertnmt.data.tokenize import EncoderTokenizer
    from bertnmt.model.build import weights_sha256
    from bertnmt.model.nmt import BertFusedTransformer
    from bertnmt.model.pretrained import PretrainedEncoder
    from bertnmt.train.freeze import FreezePolicy

    cfg = compose_cfg(spec)
    device = torch.device(spec.device)
    data = prepare_data(cfg.data)
    tok = EncoderTokenizer(cfg.bert.path, cfg.bert.max_length, cfg.bert.trust_remote_code)
    add_encoder_view(data, tok)
    fused = variant.startswith("fused") or variant.startswith("decode_fused")
    torch.manual_seed(0)
    bert = None
    if fused:
        bert = PretrainedEncoder(cfg.bert)
        if spec.random_bert:
            bert.model = type(bert.model)(bert.model.config)  # same architecture, random weights
    model = BertFusedTransformer(replace(cfg.model, fused=fused), len(data.vocab), data.vocab.pad_id, bert)
    policy = FreezePolicy(replace(cfg.freeze, policy=Policy.finetune if variant == "fused_finetune" else Policy.frozen))
    policy.apply(model, epoch=1, step=0)
    model.to(device)
    features = None
    if variant == "fused_cached":
        features = feature_cache(model.bert, data, weights_sha256(model.bert), tok.pad_id, device,
                                 cfg.bert.cache_budget_gb, FeatureCache.auto, policy.encoder_untrained(model))
        if features is None:
            raise RuntimeError("the feature cache did not fit its budget")
    return cfg, data, tok, model, policy, features, device


def train_variant(spec: BenchSpec, variant: str) -> dict[str, Any]:
    """Time ``spec.steps`` optimizer updates of one training variant; FLOPs, ATen ops and peak memory with it.

    Our variants time the Trainer's own update (:meth:`bertnmt.train.trainer.Trainer._update`: freeze policy,
    forward and backward, loss read, clipping, optimizer, schedule) on the Trainer's own batches. Marian
    runs the usual Hugging Face step (one-group AdamW) on batches of the same size."""
    from bertnmt.experiments.opcount import OpCounter

    base = "plain" if variant in ("marian", "plain_bf16") else variant
    cfg, data, tok, model, policy, features, device = _setup(spec, base)
    if variant == "plain_bf16":
        spec = replace(spec, bf16=True)
    if variant == "marian":
        step, loader, opt = _marian_step(spec, cfg, data, tok, device)
        model = step.model
        params = [p for g in opt.param_groups for p in g["params"]]
        total = sum(p.numel() for p in step.model.parameters())
    else:
        trainer = _bench_trainer(spec, cfg, data, tok, model, policy, features)
        # every variant trains on the same batches (the budget counts the encoder ids for all of them)
        step, loader = _trainer_step(trainer), _epoch_loader(spec, data, tok, features, trainer.pad_multiple)
        opt = trainer.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in model.parameters())
    opt_s = _time_optimizer_steps(opt, device)
    batches = _endless(loader)
    for _ in range(spec.warmup):
        step(next(batches).to(device, non_blocking=True))
    _sync(device)
    b = next(batches).to(device, non_blocking=True)
    with OpCounter(patch_host_reads=True) as ops:  # one whole update, outside the timed ones
        step(b)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt_s.clear()
    ntok, shapes = 0, []
    start = time.perf_counter()
    for _ in range(spec.steps):
        b = next(batches).to(device, non_blocking=True)
        step(b)
        ntok += b.ntokens
        shapes.append((b.src.size(0), b.src.size(1), b.tgt_in.size(1), b.bert_ids.size(1)))
    _sync(device)
    elapsed = time.perf_counter() - start
    epoch_batches = len(loader)
    return {"variant": variant, "step_s": elapsed / spec.steps, "tokens_per_s": ntok / elapsed,
            "epoch_batches": epoch_batches, "epoch_s_est": elapsed / spec.steps * epoch_batches,
            "peak_mb": peak_memory_mb(device), "shapes": shapes, "encoder_weights_mb": _encoder_mb(model),
            "optimizer_step_s": sum(opt_s) / max(1, len(opt_s)), "param_groups": len(opt.param_groups),
            **ops.summary(), "sync_ops": ops.syncs[:8],
            "trainable": sum(p.numel() for p in params), "total": total}


def _bench_trainer(spec: BenchSpec, cfg, data, tok, model, policy, features):
    """The Trainer of a training stage over the bench's data (its run folder is a temporary one)."""
    import tempfile

    from bertnmt.core.config import Precision
    from bertnmt.train.trainer import Trainer, model_uses_bert

    precision = Precision.bf16 if spec.bf16 else cfg.trainer.precision
    cfg = replace(cfg, trainer=replace(cfg.trainer, compile=spec.compile, precision=precision, seed=1,
                                       save_every_steps=0, max_steps=0))
    run_dir = Path(tempfile.mkdtemp(prefix="bertnmt-bench-"))
    stage = "fused" if model_uses_bert(model) else "baseline"
    trainer = Trainer(cfg, model, data, policy, run_dir, stage, {}, bert_pad_id=tok.pad_id, features=features)
    trainer.model.train()
    trainer._sync_policy(1, at_epoch_start=True)  # what train_epoch does first
    return trainer


def _trainer_step(trainer):
    from bertnmt.train.trainer import EpochPosition

    pos = EpochPosition()
    log_every = trainer.cfg.trainer.log_every

    def step(b) -> None:
        trainer._update([b], 1, pos)
        if trainer.step % log_every == 0:  # the loss read of train_epoch, once per log interval
            trainer._settle(pos, 1)

    return step


def _marian_step(spec: BenchSpec, cfg, data, tok, device):
    """The usual Hugging Face training step of MarianMTModel (one-group AdamW, the same loss)."""
    from bertnmt.train.loss import smoothed_loss

    model = marian_like(cfg.model, len(data.vocab), data.vocab.pad_id).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=1e-4)
    pad = data.vocab.pad_id
    step_model = torch.compile(model) if spec.compile else model

    def step(b) -> None:
        with _autocast(spec, device):
            logits = step_model(input_ids=b.src, attention_mask=b.src.ne(pad), decoder_input_ids=b.tgt_in,
                                decoder_attention_mask=b.tgt_in.ne(pad)).logits  # (B, T, V)
        loss, _ = smoothed_loss(logits, b.tgt_out, pad, 0.1)
        (loss / b.ntokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.model = model  # type: ignore[attr-defined]
    from bertnmt.train.trainer import resolve_pad_multiple

    pad_multiple = resolve_pad_multiple(cfg.data.pad_multiple, device, spec.compile)  # the Trainer's batches
    return step, _epoch_loader(spec, data, tok, pad_multiple=pad_multiple), opt


def _time_optimizer_steps(opt: torch.optim.Optimizer, device: torch.device) -> list[float]:
    """Seconds of each ``opt.step()`` from now on (device-synchronised), via the optimizer's step hooks."""
    times: list[float] = []
    t0 = [0.0]

    def pre(*_: Any) -> None:
        _sync(device)
        t0[0] = time.perf_counter()

    def post(*_: Any) -> None:
        _sync(device)
        times.append(time.perf_counter() - t0[0])

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    return times


def _endless(loader):
    """The loader's batches, epoch after epoch (a small corpus with large batches has fewer batches
    than the warm-up and timed updates together; a GPU run with 8,192 tokens and 3,000 pairs has 5)."""
    epoch = 1
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _epoch_loader(spec: BenchSpec, data, tok, features=None, pad_multiple: int = 1):
    from bertnmt.data.collate import make_loader

    return make_loader(data.splits["train"], spec.max_tokens, seed=1, shuffle=True, bert_pad_id=tok.pad_id,
                       features=(features or {}).get("train"), pad_multiple=pad_multiple)


def _encoder_mb(model: torch.nn.Module) -> float:
    bert = getattr(model, "bert", None)
    return 0.0 if bert is None else sum(p.numel() * p.element_size() for p in bert.parameters()) / 2**20


def marian_like(cfg, vocab: int, pad_id: int):
    """Hugging Face's MarianMTModel with our dimensions: post-LN, ReLU, sinusoids, shared embeddings."""
    from transformers import MarianConfig, MarianMTModel

    mc = MarianConfig(
        vocab_size=vocab, decoder_vocab_size=vocab, d_model=cfg.d_model, encoder_layers=cfg.enc_layers,
        decoder_layers=cfg.dec_layers, encoder_attention_heads=cfg.heads, decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, dropout=cfg.dropout, attention_dropout=0.0,
        activation_dropout=0.0, activation_function="relu", max_position_embeddings=1024, scale_embedding=True,
        pad_token_id=pad_id, eos_token_id=3, decoder_start_token_id=2, bos_token_id=2, forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return MarianMTModel(mc)


def decode_variant(spec: BenchSpec, variant: str) -> dict[str, Any]:
    """Beam search over the first ``decode_sents`` test sentences, every hypothesis forced to ``decode_len``.

    Ours through :func:`bertnmt.decoding.loop.decode_corpus`, the loop of validation and the Translator (its
    length-sorted token-budget batches); MarianMTModel's ``generate`` on the same batches."""
    import numpy as np

    from bertnmt.core.config import Precision
    from bertnmt.data.collate import collate
    from bertnmt.data.features import FeatureStore
    from bertnmt.decoding.loop import DEFAULT_MAX_TOKENS, DecodeOptions, decode_corpus, head, length_batches

    base = "plain" if variant == "decode_marian" else variant
    cfg, data, tok, model, policy, features, device = _setup(spec, base)
    fused = variant.startswith("decode_fused")
    if variant == "decode_marian":
        model = marian_like(cfg.model, len(data.vocab), data.vocab.pad_id).to(device)
    model.eval()
    split = head(data.splits["test"], spec.decode_sents)
    L, pad = spec.decode_len, data.vocab.pad_id
    opts = DecodeOptions(beam=spec.beam, lenpen=1.0, max_len_a=0.0, max_len_b=L, min_len=L,
                         max_tokens=spec.decode_tokens, check_every=spec.check_every,
                         precision=Precision.bf16 if spec.bf16 else Precision.auto)
    budget = opts.max_tokens or DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cpu"])
    batches = length_batches([len(s) for s in split.src_ids], [len(e) for e in split.bert_ids], spec.beam, budget)
    bert_ids = split.bert_ids if fused else None
    store = None
    if variant == "decode_fused_cached":  # H_B of the test sentences computed beforehand (the feature cache)
        with torch.inference_mode():
            rows = []
            for i in range(len(split.bert_ids)):
                ids = torch.as_tensor(split.bert_ids[i], dtype=torch.long, device=device).unsqueeze(0)  # (1, E)
                rows.append(model.bert(ids, torch.ones_like(ids))[0].half().cpu().numpy())  # (E, Hb)
        store = FeatureStore(np.concatenate(rows), np.cumsum([0] + [len(r) for r in rows]))

    def run(n: int) -> int:
        if variant != "decode_marian":
            found = decode_corpus(model, split.src_ids[:n], bert_ids[:n] if bert_ids else None, opts, device,
                                  tok.pad_id if fused else None, store)
            return sum(len(h[0][0]) + 1 for h in found)
        n_tok = 0
        empty = np.zeros(0, dtype=np.int32)
        for idx in ([i for i in b if i < n] for b in batches):
            if not idx:
                continue
            b = collate([(i, split.src_ids[i], empty, None, None) for i in idx]).to(device)
            with torch.inference_mode(), _autocast(spec, device):
                out = model.generate(input_ids=b.src, attention_mask=b.src.ne(pad), num_beams=spec.beam,
                                     min_new_tokens=L + 1, max_new_tokens=L + 1, do_sample=False,
                                     length_penalty=1.0, early_stopping=False)
            n_tok += (out.size(1) - 1) * out.size(0)
        return n_tok

    run(min(8, len(split)))  # warm-up
    _sync(device)
    start = time.perf_counter()
    n_tok = run(len(split))
    _sync(device)
    elapsed = time.perf_counter() - start
    n = len(split)
    shapes = [(len(b), max(len(split.src_ids[i]) + 1 for i in b), 0, max(len(split.bert_ids[i]) for i in b))
              for b in batches]
    return {"variant": variant, "sents_per_s": n / elapsed, "decode_s": elapsed, "sentences": n,
            "tokens_out": n_tok, "peak_mb": peak_memory_mb(device), "shapes": shapes}


def worker(spec: BenchSpec, variant: str) -> dict[str, Any]:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if variant in DECODE_VARIANTS:
        return decode_variant(spec, variant)
    return train_variant(spec, variant)


def run_all(spec: BenchSpec, variants: list[str], log=print) -> dict[str, dict[str, Any]]:
    """Each variant in a fresh process (its own peak memory), the list ``spec.repeat`` times interleaved;
    per variant the fastest run is kept (the machine is shared and noisy: see docs/benchmarks.md)."""
    results: dict[str, dict[str, Any]] = {}
    env = child_env({**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    for rnd in range(max(1, spec.repeat)):
        for v in variants:
            cmd = [sys.executable, "-m", "bertnmt.experiments.bench", "--worker", v, "--spec", json.dumps(asdict(spec))]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                log(f"  {v}: failed ({tail})")
                continue
            r = json.loads(lines[-1])
            key = "decode_s" if v in DECODE_VARIANTS else "step_s"
            times = results.get(v, {}).get("runs", []) + [r[key]]
            if v not in results or r[key] < results[v][key]:
                results[v] = r
            results[v]["runs"] = times
            log(f"  round {rnd + 1}: {v} {key} {r[key]:.3f} ({time.perf_counter() - t0:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f, default in asdict(BenchSpec()).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--variants", default=",".join(TRAIN_VARIANTS + DECODE_VARIANTS), help="comma-separated")
    p.add_argument("--out", default=None, help="also write the raw figures as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        tune_host_memory()  # as every entry point does (the workers' THP setting comes with child_env)
        spec = BenchSpec(**json.loads(args.spec))
        print(json.dumps(worker(spec, args.worker)))
        return 0
    spec = BenchSpec(**{f: getattr(args, f) for f in asdict(BenchSpec())})
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in TRAIN_VARIANTS + DECODE_VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {TRAIN_VARIANTS + DECODE_VARIANTS}", file=sys.stderr)
        return 2
    print(f"bench: {len(variants)} variants, each in its own process", flush=True)
    compose_cfg(spec)  # a bad option fails here, once
    print("preparing the data and the feature cache (shared by the workers)", flush=True)
    _setup(spec, "fused_cached" if "fused_cached" in variants else "plain")
    res = run_all(spec, variants, log=lambda m: print(m, flush=True))
    text = report(spec, res, device_name(spec))
    print(text)
    if args.out:
        from bertnmt.core.atomic import write_text

        write_text(args.out, json.dumps({"spec": asdict(spec), "device": device_name(spec), "results": res,
                                         "report": text}, indent=1))
    return 0 if len(res) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
