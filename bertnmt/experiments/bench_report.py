"""The benchmark's report: the figures as markdown tables, with the ratios and the speed goals."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bertnmt.core import host_memory
from bertnmt.experiments.bench_spec import BF16_PEAK, DECODE_VARIANTS, TRAIN_VARIANTS, BenchSpec, compose_cfg


def report(spec: BenchSpec, res: dict[str, dict[str, Any]], device_name: str) -> str:
    """The figures as markdown tables, with the ratios and the speed goals."""
    from bertnmt.experiments.flops import EncoderDims, training_flops

    cfg = compose_cfg(spec)
    out = [f"bench: model={spec.model} (d {cfg.model.d_model}, FFN {cfg.model.ffn_dim}, {cfg.model.heads} heads, "
           f"{cfg.model.enc_layers}+{cfg.model.dec_layers} layers), encoder {spec.bert}"
           f"{' (random weights)' if spec.random_bert else ''}, data {spec.data} ({spec.sentences} pairs), "
           f"max_tokens {spec.max_tokens}, {spec.steps} timed updates after {spec.warmup}; device {device_name}"
           f"{', bf16 autocast' if spec.bf16 or spec.device.startswith('cuda') else ', fp32'}"
           f"{', torch.compile' if spec.compile else ''}; host allocator "
           f"{host_memory.setting()} (bertnmt.core.host_memory)", ""]
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
    return {"decode_plain": 1.0, "decode_marian": 1.0, "decode_fused_cached": cached / plain,
            "decode_fused": live / plain}


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
