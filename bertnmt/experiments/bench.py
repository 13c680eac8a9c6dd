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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bertnmt.core.paths import CONF_DIR, PROJECT_ROOT
from bertnmt.core.devices import autocast, peak_memory_mb

TRAIN_VARIANTS = ["plain", "fused_cached", "fused_live", "fused_finetune", "marian", "plain_bf16"]
DECODE_VARIANTS = ["decode_plain", "decode_fused_cached", "decode_fused", "decode_marian"]
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "V100": 125e12}


@dataclass
class BenchSpec:
    model: str = "small"  # a conf/model option, or "big" (d 1024, FFN 4096, 16 heads, 6+6)
    bert: str = "minilm"  # a conf/bert option
    random_bert: bool = False  # a random encoder of the same config (GPU machines without the weights)
    data: str = "multi30k_en_de"
    sentences: int = 3000  # training pairs prepared for the benchmark (data.train_limit)
    max_tokens: int = 2048
    steps: int = 12  # timed optimizer updates per training variant
    warmup: int = 3  # untimed updates first
    decode_sents: int = 480
    decode_len: int = 16  # every hypothesis is forced to this many tokens (+ eos)
    decode_tokens: int = 0  # decoding's token budget per batch (eval.max_tokens; 0 = the device's default)
    check_every: int = 0  # decoding steps between checks for done sentences (eval.check_every; 0 = by device)
    beam: int = 5
    device: str = "cpu"
    bf16: bool = False  # autocast to bf16 (always on with CUDA)
    compile: bool = False  # torch.compile the NMT model (training variants)
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    repeat: int = 2  # run the whole list this many times, interleaved; keep each variant's fastest run
    overrides: str = ""  # extra Hydra overrides, space-separated (e.g. "bert.path=/models/minilm data=custom ...")


def compose_cfg(spec: BenchSpec):
    """The training Config of the benchmark (Hydra compose of conf/, then typed)."""
    from hydra import compose, initialize_config_dir

    from bertnmt.core.config import register_configs, to_config

    register_configs()
    model = "iwslt" if spec.model == "big" else spec.model
    overrides = [f"model={model}", f"bert={spec.bert}", f"data={spec.data}", f"data.train_limit={spec.sentences}",
                 f"data.max_tokens={spec.max_tokens}", "trainer.progress=false", "trainer.tensorboard=false",
                 f"trainer.device={spec.device}"]
    if spec.model == "big":
        overrides += ["model.d_model=1024", "model.ffn_dim=4096", "model.heads=16", "model.name=big"]
    overrides += spec.overrides.split()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(spec: BenchSpec, device: torch.device):
    return autocast(device, "bf16" if spec.bf16 else "auto")  # the Trainer's: bf16 on CUDA, fp32 on the CPU


def _setup(spec: BenchSpec, variant: str):
    """Data (with encoder ids), the fused or plain model, its policy and cached features, the device."""
    from bertnmt.data.features import feature_cache
    from bertnmt.data.prepare import add_encoder_view, prepare_data
    from bertnmt.data.tokenize import EncoderTokenizer
    from bertnmt.train.freeze import FreezePolicy
    from bertnmt.model.nmt import BertFusedTransformer
    from bertnmt.model.pretrained import PretrainedEncoder
    from bertnmt.model.build import weights_sha256

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
    policy = FreezePolicy(replace(cfg.freeze, policy="finetune" if variant == "fused_finetune" else "frozen"))
    policy.apply(model, epoch=1, step=0)
    model.to(device)
    features = None
    if variant == "fused_cached":
        features = feature_cache(model.bert, data, weights_sha256(model.bert), tok.pad_id, device,
                                 cfg.bert.cache_budget_gb, "auto", policy.encoder_untrained(model))
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
        shapes.append((b.src.size(0), b.src.size(1), b.tgt_in.size(1), b.enc_ids.size(1)))
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

    from bertnmt.train.trainer import Trainer, model_uses_bert

    precision = "bf16" if spec.bf16 else cfg.trainer.precision
    cfg = replace(cfg, trainer=replace(cfg.trainer, compile=spec.compile, precision=precision, seed=1,
                                       save_every_steps=0, max_steps=0))
    run_dir = Path(tempfile.mkdtemp(prefix="bertnmt-bench-"))
    stage = "fused" if model_uses_bert(model) else "baseline"
    trainer = Trainer(cfg, model, data, policy, run_dir, stage, {}, enc_pad_id=tok.pad_id, features=features)
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
    from bertnmt.train.trainer import smoothed_loss

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

    return make_loader(data.splits["train"], spec.max_tokens, seed=1, shuffle=True, enc_pad_id=tok.pad_id,
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
                         precision="bf16" if spec.bf16 else "auto")
    budget = opts.max_tokens or DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cpu"])
    batches = length_batches([len(s) for s in split.src_ids], [len(e) for e in split.enc_ids], spec.beam, budget)
    enc_ids = split.enc_ids if fused else None
    store = None
    if variant == "decode_fused_cached":  # H_B of the test sentences computed beforehand (the feature cache)
        with torch.inference_mode():
            rows = []
            for i in range(len(split.enc_ids)):
                ids = torch.as_tensor(split.enc_ids[i], dtype=torch.long, device=device).unsqueeze(0)  # (1, E)
                rows.append(model.bert(ids, torch.ones_like(ids))[0].half().cpu().numpy())  # (E, Hb)
        store = FeatureStore(np.concatenate(rows), np.cumsum([0] + [len(r) for r in rows]))

    def run(n: int) -> int:
        if variant != "decode_marian":
            found = decode_corpus(model, split.src_ids[:n], enc_ids[:n] if enc_ids else None, opts, device,
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
    shapes = [(len(b), max(len(split.src_ids[i]) + 1 for i in b), 0, max(len(split.enc_ids[i]) for i in b))
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
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
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


# -- the report -----------------------------------------------------------------------------------
def report(spec: BenchSpec, res: dict[str, dict[str, Any]], device_name: str) -> str:
    """The figures as markdown tables, with the ratios and the speed goals."""
    from bertnmt.experiments.flops import EncoderDims, training_flops

    cfg = compose_cfg(spec)
    out = [f"bench: model={spec.model} (d {cfg.model.d_model}, FFN {cfg.model.ffn_dim}, {cfg.model.heads} heads, "
           f"{cfg.model.enc_layers}+{cfg.model.dec_layers} layers), encoder {spec.bert}"
           f"{' (random weights)' if spec.random_bert else ''}, data {spec.data} ({spec.sentences} pairs), "
           f"max_tokens {spec.max_tokens}, {spec.steps} timed updates after {spec.warmup}; device {device_name}"
           f"{', bf16 autocast' if spec.bf16 or spec.device.startswith('cuda') else ', fp32'}"
           f"{', torch.compile' if spec.compile else ''}", ""]
    plain = res.get("plain")
    floors: dict[str, float] = {}
    flops = None
    if plain:
        from transformers import AutoConfig

        from bertnmt.data.tokenize import resolve_model_path

        dims = EncoderDims.from_hf(AutoConfig.from_pretrained(resolve_model_path(cfg.bert.path)))
        vocab = cfg.data.vocab_size
        flops = training_flops(cfg.model, vocab, [tuple(s) for s in plain["shapes"]], dims)
        floors = flops.floors()
    out += ["| training variant | step ms | target tok/s | epoch s (est.) | time / plain | FLOPs floor | "
            "time / floor | peak MB | trainable / total | ATen ops / update | kernel-launching | host syncs | "
            "optimizer.step ms | param groups |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in TRAIN_VARIANTS:
        r = res.get(v)
        if not r:
            continue
        ratio = r["step_s"] / plain["step_s"] if plain else float("nan")
        floor = floors.get(v, 1.0)
        out.append(f"| {v} | {1000 * r['step_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['epoch_s_est']:.0f} | "
                   f"{ratio:.2f} | {floor:.2f} | {ratio / floor:.2f} | {r['peak_mb']:,.0f} | "
                   f"{r['trainable']:,} / {r['total']:,} | {r.get('aten_ops', 0):,} | {r.get('aten_launching', 0):,} | "
                   f"{r.get('host_syncs', 0)} | {1000 * r.get('optimizer_step_s', 0.0):.1f} | "
                   f"{r.get('param_groups', 0)} |")
    if plain and flops is not None and spec.device.startswith("cuda"):
        peak = next((v for k, v in BF16_PEAK.items() if k in device_name), None)
        steps = len(plain["shapes"])
        for v, f in (("plain", flops.plain), ("fused_cached", flops.fused_cached)):
            if v in res and peak:
                achieved = f / steps / res[v]["step_s"]
                out.append(f"\n{v}: {achieved / 1e12:.1f} TFLOP/s = MFU {100 * achieved / peak:.1f}% of the "
                           f"{peak / 1e12:.0f} TFLOP/s bf16 peak")
    out.append("")
    goals = []
    if plain and "fused_cached" in res:
        r = res["fused_cached"]["step_s"] / plain["step_s"] / floors["fused_cached"]
        goals.append(f"fused + frozen + cached <= 1.1 x floor: {r:.2f} x -> {'met' if r <= 1.1 else 'MISSED'}")
    for v in ("fused_cached", "fused_live"):
        if plain and v in res:
            limit = (plain["peak_mb"] + res[v]["encoder_weights_mb"]) * 1.1
            goals.append(f"{v} peak memory <= (plain + encoder weights) x 1.1: {res[v]['peak_mb']:,.0f} MB vs "
                         f"{limit:,.0f} MB -> {'met' if res[v]['peak_mb'] <= limit else 'MISSED'}")
    if plain and "marian" in res:
        r = res["marian"]["step_s"] / plain["step_s"]
        goals.append(f"training, ours vs MarianMTModel >= 1.2 x: {r:.2f} x -> {'met' if r >= 1.2 else 'MISSED'}")
        m = res["marian"]
        if "aten_launching" in plain and "aten_launching" in m:
            ok = plain["aten_launching"] <= m["aten_launching"]
            goals.append(f"kernel-launching ATen ops per update <= MarianMTModel's: {plain['aten_launching']:,} vs "
                         f"{m['aten_launching']:,} -> {'met' if ok else 'MISSED'}")
    for v in ("plain", "fused_cached"):
        if v in res and "aten_ops" in res[v]:
            r = res[v]
            goals.append(f"{v}: total ATen ops per update <= 3,000: {r['aten_ops']:,} -> "
                         f"{'met' if r['aten_ops'] <= 3000 else 'MISSED'}; host syncs in the update: "
                         f"{r['host_syncs']} -> {'met' if r['host_syncs'] == 0 else 'MISSED'}")
    dec = {v: res[v] for v in DECODE_VARIANTS if v in res}
    if dec:
        dfloor = decode_floors(spec, cfg, dec)
        out += [f"| decoding (beam {spec.beam}, {spec.decode_len} tokens + eos each) | sentences/s | time / plain | "
                "FLOPs floor |", "|---|---|---|---|"]
        base = dec.get("decode_plain")
        for v, r in dec.items():
            ratio = r["decode_s"] / base["decode_s"] if base else float("nan")
            out.append(f"| {v} | {r['sents_per_s']:.1f} | {ratio:.2f} | {dfloor.get(v, float('nan')):.2f} |")
        out.append("")
        for v, what in (("decode_fused_cached", "H_B cached"), ("decode_fused", "encoder live")):
            if base and v in dec:
                r = dec[v]["decode_s"] / base["decode_s"]
                goals.append(f"fused decoding ({what}) <= 1.25 x plain: {r:.2f} x (FLOPs floor {dfloor.get(v, 0):.2f}) "
                             f"-> {'met' if r <= 1.25 else 'MISSED'}")
        if base and "decode_marian" in dec:
            r = dec["decode_marian"]["decode_s"] / base["decode_s"]
            goals.append(f"decoding, ours vs MarianMTModel.generate >= 1.5 x: {r:.2f} x -> "
                         f"{'met' if r >= 1.5 else 'MISSED'}")
    return "\n".join(out + ["goals:"] + [f"- {g}" for g in goals])


def decode_floors(spec: BenchSpec, cfg, dec: dict[str, dict[str, Any]]) -> dict[str, float]:
    """FLOPs of each decoding variant over the plain model's, on the same batches (bertnmt.experiments.flops)."""
    from transformers import AutoConfig

    from bertnmt.data.tokenize import resolve_model_path
    from bertnmt.experiments.flops import EncoderDims, beam_decode_flops, encoder_forward_flops

    shapes = next(iter(dec.values())).get("shapes", [])
    dims = EncoderDims.from_hf(AutoConfig.from_pretrained(resolve_model_path(cfg.bert.path)))
    V, K, steps = cfg.data.vocab_size, spec.beam, spec.decode_len + 1
    plain = sum(beam_decode_flops(cfg.model, V, B, S, E, K, steps) for B, S, _, E in shapes)
    cached = sum(beam_decode_flops(cfg.model, V, B, S, E, K, steps, dims.hidden, fused=True) for B, S, _, E in shapes)
    live = cached + sum(encoder_forward_flops(dims, B, E) for B, _, _, E in shapes)
    if not plain:
        return {}
    return {"decode_plain": 1.0, "decode_marian": 1.0, "decode_fused_cached": cached / plain, "decode_fused": live / plain}


def device_name(spec: BenchSpec) -> str:
    if spec.device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model or platform.processor()} x {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
