"""The ablation table: every row's config composes and builds its model, the warm-started rows share one
baseline, the report's numbers, and (slow) the whole table at toy size through Hydra multirun, resumed."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bertnmt.core.errors import ConfigError
from bertnmt.core.paths import CONF_DIR
from bertnmt.experiments.ablation import (
    check_shared_baseline,
    compose_row,
    compose_rows,
    multirun_command,
    run_ablation,
)
from bertnmt.experiments.ablation_report import collect, deltas, table_markdown, write_report
from bertnmt.experiments.rows import ROW_BY_NAME, ROWS, parse_seeds, row_dir, select_rows
from bertnmt.recipe.baseline import baseline_key
from bertnmt.recipe.pipeline import check_freeze, scratch_trainer
from tests.helpers.tiny_encoder import make_tiny_bert
from tests.helpers.toy_corpus import custom_overrides, write_toy_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_bert6(tmp_path_factory) -> str:
    """A tiny random encoder (32 wide) with MiniLM's 6 blocks, so that every layer row exists in it."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert6"), layers=6)


def test_registry_matches_the_config_files() -> None:
    files = {p.stem for p in (CONF_DIR / "exp" / "ablation").glob("*.yaml")}
    assert files == set(ROW_BY_NAME)
    assert ROWS[0].name == "transformer" and ROW_BY_NAME["fused"].paper_delta == pytest.approx(1.88)
    # the table: every row with its paper BLEU
    paper = {"transformer": 28.57, "fused": 30.45, "no_warm_start": 27.03, "finetune": 28.87,
             "bert_init_encoder": 27.14, "feature_based": 29.67, "no_enc_bert_attn": 29.87, "no_dec_bert_attn": 29.90,
             "stacked": 29.35,
             "transformer_12l": 29.27, "transformer_18l": 28.92}
    assert {r.name: r.paper_bleu for r in ROWS if r.paper_bleu is not None} == paper
    names = set(ROW_BY_NAME)
    assert {f"dropnet_0{k}" for k in (0, 2, 4, 6, 8)} | {f"layer_{k}" for k in range(1, 6)} <= names
    assert {"layer_mix", "fuse_first_3", "fuse_last_3", "random_features", "random_encoder"} <= names


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_row_config_composes_with_its_header_and_start(row) -> None:
    cfg = compose_row(row)
    assert cfg.name == row.name
    header = (CONF_DIR / "exp" / f"{row.exp}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_"
    assert f"python scripts/train.py +exp={row.exp}" in header[1]
    if row.paper_bleu is not None:
        assert f"= {row.paper_bleu:.2f} BLEU" in header[2]
    else:
        assert "no paper number" in header[2] or "no number here" in header[2]
    w = cfg.warm_start
    if row.init == "scratch":
        assert not w.auto and w.path is None and w.scratch_budget == "total"
    elif row.init == "continued":
        assert not cfg.model.fused and w.auto
    else:
        assert cfg.model.fused and w.auto and w.scratch_budget == "stage"
    assert cfg.freeze.policy == ("finetune" if row.name in ("finetune", "bert_init_encoder") else "frozen")


# what distinguishes each row's model (a BertFusedTransformer built from its composed config)
def _fused_layers(stack) -> list[int]:
    return [i for i, layer in enumerate(stack.layers) if layer.bert_attn is not None]


CHECKS = {
    "transformer": lambda m, c: m.bert is None and len(m.encoder.layers) == 2,
    "fused": lambda m, c: _fused_layers(m.encoder) == [0, 1] and _fused_layers(m.decoder) == [0, 1],
    "no_warm_start": lambda m, c: _fused_layers(m.encoder) == [0, 1] and not c.warm_start.auto,
    "finetune": lambda m, c: c.freeze.policy == "finetune" and _fused_layers(m.decoder) == [0, 1],
    "bert_init_encoder": lambda m, c: m.encoder is None and m.bert is not None and not _fused_layers(m.decoder),
    "feature_based": lambda m, c: m.bert_proj is not None and not _fused_layers(m.encoder) + _fused_layers(m.decoder),
    "no_enc_bert_attn": lambda m, c: _fused_layers(m.encoder) == [] and _fused_layers(m.decoder) == [0, 1],
    "no_dec_bert_attn": lambda m, c: _fused_layers(m.encoder) == [0, 1] and _fused_layers(m.decoder) == [],
    "stacked": lambda m, c: (all(layer.stacked for layer in m.encoder.layers)
                             and m.decoder.layers[1].bert_attn_ln is not None),
    "transformer_12l": lambda m, c: m.bert is None and len(m.encoder.layers) == 12,
    "transformer_18l": lambda m, c: m.bert is None and len(m.encoder.layers) == 18,
    "layer_mix": lambda m, c: m.bert_mix is not None and m.bert_mix.weights.numel() == 7,  # embeddings + 6 blocks
    "fuse_first_3": lambda m, c: _fused_layers(m.encoder) == [0, 1, 2] and _fused_layers(m.decoder) == [0, 1, 2],
    "fuse_last_3": lambda m, c: _fused_layers(m.encoder) == [1, 2, 3] and _fused_layers(m.decoder) == [1, 2, 3],
    "random_features": lambda m, c: m.bert.random_features,
    "random_encoder": lambda m, c: c.bert.random_init,
}
for _k in (0, 2, 4, 6, 8):
    CHECKS[f"dropnet_0{_k}"] = lambda m, c, k=_k: all(layer.fused.drop_net.p == k / 10 for layer in m.encoder.layers)
for _k in range(1, 6):
    CHECKS[f"layer_{_k}"] = lambda m, c, k=_k: m.bert.layer == k


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_every_row_builds_its_model(row, tiny_bert6) -> None:
    overrides = ["model=tiny", f"bert.path={tiny_bert6}", "data.vocab_size=40"]
    if row.name.startswith("fuse_"):  # first:3 / last:3 do not fit the tiny model's 2 layers: a clear error
        with pytest.raises(ConfigError, match="model.fuse_layers='(first|last):3'"):
            check_freeze(compose_row(row, overrides))
        overrides += ["model.enc_layers=4", "model.dec_layers=4"]
    cfg = compose_row(row, overrides)
    policy, model = check_freeze(cfg)  # the model with the row's freeze policy bound
    assert CHECKS[row.name](model, cfg), row.name
    model.eval()
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    tgt = torch.tensor([[2, 5, 6], [2, 7, 0]])
    bert_ids = torch.tensor([[101, 2000, 2001, 102], [101, 2002, 102, 0]])
    with torch.no_grad():
        assert model(src, tgt, bert_ids, bert_ids.ne(0).long()).shape == (2, 3, 40)
    policy.apply(model, epoch=1)
    if model.bert is not None:
        assert model.bert.frozen == (cfg.freeze.policy == "frozen")


def test_warm_started_rows_share_one_baseline() -> None:
    data = SimpleNamespace(key="datakey", vocab=SimpleNamespace(sha256="vocabsha"))
    composed = compose_rows(ROWS, ["model=tiny", "warm_start.max_epochs=1", "optim=paper"])
    cfgs = {name: c for (name, _), c in composed.items()}
    check_shared_baseline(cfgs)
    keys = {baseline_key(c, data) for c in cfgs.values() if c.warm_start.auto}
    assert len(keys) == 1 and sum(c.warm_start.auto for c in cfgs.values()) == 21
    # the README's main job (+exp=frozen_bert) trains the same baseline: its cache serves the table
    from hydra import compose, initialize_config_dir

    from bertnmt.core.config import to_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        main_job = to_config(compose(config_name="config", overrides=["+exp=frozen_bert"]))
    assert baseline_key(main_job, data) == baseline_key(compose_row(ROW_BY_NAME["fused"]), data)
    bad = {"fused": compose_row(ROW_BY_NAME["fused"]),
           "stacked": compose_row(ROW_BY_NAME["stacked"], ["model.d_model=64"])}
    with pytest.raises(ConfigError, match="different warm-start baselines"):
        check_shared_baseline(bad)


def test_row_selection_seeds_and_overrides() -> None:
    assert [r.name for r in select_rows("stacked, transformer")] == ["transformer", "stacked"]  # table order
    assert len(select_rows(None)) == len(ROWS) == len(select_rows("all"))
    with pytest.raises(ConfigError, match="unknown row.*stackd"):
        select_rows("stackd")
    assert parse_seeds("1,2,3") == [1, 2, 3] and parse_seeds(None) is None
    for bad in ("1,x", "1,1", ""):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    for bad in ("trainer.seed=3", "name=x", "hydra.sweep.dir=/tmp/x"):
        with pytest.raises(ConfigError, match="sets .* itself"):
            run_ablation("/nonexistent/never", "fused", [bad])
    with pytest.raises(ConfigError, match="row fused .*d_modle"):
        run_ablation("/nonexistent/never", "fused", ["model.d_modle=3"])
    cmd = multirun_command(select_rows("transformer,fused"), 2, Path("out"), ["trainer.max_epochs=1"])
    assert cmd[1].endswith("scripts/train.py") and cmd[2] == "-m"
    assert "+exp=ablation/transformer,ablation/fused" in cmd and "trainer.seed=2" in cmd
    assert "hydra.sweep.subdir=${name}/seed${trainer.seed}" in cmd and cmd[-1] == "trainer.max_epochs=1"


def test_scratch_budget_is_baseline_plus_own_stage() -> None:
    split = SimpleNamespace(src_ids=[[5] * 4] * 10, tgt_ids=[[5] * 4] * 10, bert_ids=None)
    data = SimpleNamespace(splits={"train": split})
    cfg = compose_row(ROW_BY_NAME["no_warm_start"],
                      ["warm_start.max_epochs=3", "trainer.max_epochs=2", "data.max_tokens=10"])
    t = scratch_trainer(cfg, data)
    assert (t.max_epochs, t.max_steps) == (5, 0)
    # 10 sentences of width 5, 10 tokens a batch: 5 updates an epoch; the fused stage capped at 4 updates
    t = scratch_trainer(replace(cfg, trainer=replace(cfg.trainer, max_steps=4)), data)
    assert (t.max_epochs, t.max_steps) == (5, 3 * 5 + 4)
    stage = compose_row(ROW_BY_NAME["no_warm_start"], ["warm_start.scratch_budget=stage", "trainer.max_epochs=2"])
    assert scratch_trainer(stage, data).max_epochs == 2


def _fake_run(out: Path, row: str, seed: int, bleu: float | None, *, warm: bool = True, epochs: int = 1) -> None:
    d = row_dir(out, row, seed)
    d.mkdir(parents=True)
    stage = "transformer" if row == "transformer" else ("fused" if row not in ("transformer_12l",) else "baseline")
    own = {"epochs": epochs, "mean_epoch_time_s": 10.0 + seed, "trainable_params": 100, "total_params": 1000}
    if bleu is not None:
        own["test_bleu"] = bleu
    summary = {"name": row, stage: own, "final_stage": stage, "warm_start": "ckpt" if warm else None}
    if warm:
        summary["baseline"] = {"epochs": 3, "test_bleu": 13.9}
    (d / "summary.json").write_text(json.dumps(summary))


def test_report_numbers(tmp_path: Path) -> None:
    _fake_run(tmp_path, "transformer", 1, 20.0)
    _fake_run(tmp_path, "transformer", 2, 22.0)
    _fake_run(tmp_path, "fused", 1, 23.0)
    _fake_run(tmp_path, "fused", 2, 24.0)
    _fake_run(tmp_path, "transformer_12l", 1, 19.5, warm=False, epochs=4)
    (tmp_path / "stacked" / "seed1").mkdir(parents=True)  # unfinished: no summary.json
    results = collect(tmp_path)
    assert [r.row.name for r in results] == ["transformer", "fused", "transformer_12l"]
    d = deltas(results)
    assert d["fused"] == pytest.approx(2.5) and d["transformer"] == 0 and d["transformer_12l"] == pytest.approx(-1.5)
    table = table_markdown(results)
    fused = next(line for line in table.splitlines() if "`ablation/fused`" in line)
    assert "| warm start | 3+1 | 23.50 ± 0.71 (n=2) | +2.50 | 30.45 | +1.88 | 11.50 | 100 / 1,000 |" in fused
    deep = next(line for line in table.splitlines() if "`ablation/transformer_12l`" in line)
    assert "| scratch | 4 | 19.50 | -1.50 | 29.27 | +0.70 |" in deep
    md = write_report(tmp_path, command="python scripts/ablate.py x")
    text = md.read_text()
    assert "`python scripts/ablate.py x`" in text and "![BLEU deltas](ablations.png)" in text
    assert "stacked" in text.split("Not run")[1] and "test BLEU 13.90" in text
    png = tmp_path / "ablations.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_script_is_thin_and_reports_errors(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("ablate_script", ROOT / "scripts" / "ablate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--rows", "nope", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --rows: unknown row(s) nope")
    _fake_run(tmp_path, "transformer", 1, 20.0)
    assert mod.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "Transformer (no pretrained encoder)" in (tmp_path / "ablations.md").read_text()


def _bleu_of(md: str, row: str) -> float:
    line = next(line for line in md.splitlines() if f"`ablation/{row}`" in line)
    return float(line.split("|")[5].split()[0])


@pytest.mark.slow
def test_toy_table_runs_every_row_through_multirun_and_resumes(tmp_path: Path, tiny_bert6: str) -> None:
    bert = tiny_bert6
    custom = write_toy_corpus(tmp_path / "corpus")
    overrides = custom_overrides(custom) + [
        "model=tiny", f"bert.path={bert}", "bert.name=tiny-bert", f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=100", "data.max_tokens=400", "trainer.max_epochs=1", "warm_start.max_epochs=1",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.valid_bleu=false", "optim.warmup_steps=10",
        "optim.lr=3e-3", "eval.beam=2",
    ]
    out = tmp_path / "ablations"
    two_layer = [r.name for r in ROWS if not r.name.startswith("fuse_")]
    run_ablation(out, two_layer, overrides)
    # the subset rows need 3 layers in each stack (the tiny model has 2): a second call into the same folder
    md = run_ablation(out, "fuse_first_3,fuse_last_3", [*overrides, "model.enc_layers=3", "model.dec_layers=3"])
    text = md.read_text()
    results = collect(out)
    assert {r.row.name for r in results} == set(ROW_BY_NAME)
    for r in results:
        assert math.isfinite(_bleu_of(text, r.row.name)) and len(r.bleu) == 1, r.row.name
        assert r.row.label in text
    assert "Not run" not in text and (out / "ablations.png").stat().st_size > 5000
    # one baseline for the first call: trained once (in the first warm-started row), reused by all the others
    first = [r for r in results if r.row.name in two_layer and r.start in ("warm start", "continued")]
    warm = {json.loads((Path(r.run_dirs[0]) / "summary.json").read_text())["warm_start"] for r in first}
    assert len(first) == 19 and len(warm) == 1  # 26 rows - 5 from scratch - 2 in the second call
    # resumable: finished rows are skipped; an unfinished one runs again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    (out / "stacked" / "seed1" / "summary.json").unlink()
    run_ablation(out, "transformer,stacked,fused", overrides, launcher="inprocess")
    for p, t in stamps.items():
        if p.parts[-3] != "stacked":
            assert p.stat().st_mtime_ns == t, p
    assert re.search(r"\| stacked instead of averaged attentions \| `ablation/stacked` \| warm start \| 1\+1 "
                     r"\| \d+\.\d\d \|", (out / "ablations.md").read_text())


# -- the converged sweep ------------------------------------------------------------------------
def test_early_stopping_rule_is_a_function_of_the_epoch_records() -> None:
    from bertnmt.core.config import EarlyStopConfig
    from bertnmt.train.early_stop import best_epoch, check_early_stop, early_stop_epoch

    recs = [{"epoch": i + 1, "valid_loss": v, "valid_bleu": b}
            for i, (v, b) in enumerate([(3.0, 10), (2.5, 12), (2.49, 11), (2.6, 13), (2.7, 12.5)])]
    loss = EarlyStopConfig(patience=2, metric="loss")
    assert early_stop_epoch(recs[:4], loss) is None and early_stop_epoch(recs, loss) == 5
    assert best_epoch(recs, loss) == 3
    # min_delta: 2.49 is not an improvement of more than 0.05 on 2.5, so epochs 3 and 4 both count as bad
    coarse = EarlyStopConfig(patience=2, metric="loss", min_delta=0.05)
    assert early_stop_epoch(recs, coarse) == 4 and best_epoch(recs, coarse) == 2
    bleu = EarlyStopConfig(patience=2, metric="bleu")
    assert early_stop_epoch(recs, bleu) is None and best_epoch(recs, bleu) == 4
    assert early_stop_epoch(recs, EarlyStopConfig(patience=0)) is None  # off
    assert early_stop_epoch(recs, EarlyStopConfig(patience=1, metric="bleu")) == 3
    with pytest.raises(ConfigError, match="trainer.early_stop.metric='ppl' is not one of loss, bleu"):
        EarlyStopConfig(metric="ppl")
    for bad, match in ((EarlyStopConfig(patience=-1), "patience=-1"),
                       (EarlyStopConfig(patience=2, metric="bleu"), "needs trainer.valid_bleu")):
        with pytest.raises(ConfigError, match=match):
            check_early_stop(bad, valid_bleu=False)


def test_converge_preset_and_job_order() -> None:
    from bertnmt.experiments.rows import plan_jobs

    cfg = compose_row(ROW_BY_NAME["fused"], ["trainer=converge"])
    es = cfg.trainer.early_stop
    assert (es.patience, es.metric, cfg.trainer.max_epochs, cfg.trainer.save_every_steps) == (2, "loss", 25, 200)
    jobs = plan_jobs("transformer@1,fused@1,transformer@2,fused@2,dropnet_00@1,finetune,no_warm_start@1", [1])
    assert [(r.name, s) for r, s in jobs] == [("transformer", 1), ("fused", 1), ("transformer", 2), ("fused", 2),
                                              ("dropnet_00", 1), ("finetune", 1), ("no_warm_start", 1)]
    assert [(r.name, s) for r, s in plan_jobs("fused,transformer", [1, 2])] == [
        ("transformer", 1), ("fused", 1), ("transformer", 2), ("fused", 2)]  # without @: seed-major, table order
    for bad, match in (("fused@x", "NAME@SEED"), ("fused@1,fused@1", "listed twice"), ("fusd@1", "unknown row")):
        with pytest.raises(ConfigError, match=match):
            plan_jobs(bad, [1])


def _hyps(out: Path, row: str, seed: int, refs: list[str], hyps: list[str]) -> None:
    d = row_dir(out, row, seed)
    (d / "test.ref").write_text("".join(r + "\n" for r in refs))
    stage = "transformer" if row == "transformer" else "fused"
    (d / f"test.{stage}.hyp").write_text("".join(h + "\n" for h in hyps))
    summary = json.loads((d / "summary.json").read_text())
    summary[stage].update(best_epoch=4, epochs=6, stop="early_stop", test_chrf=50.0 + seed)
    (d / "summary.json").write_text(json.dumps(summary))


def test_converged_table_with_pending_rows_and_paired_bootstrap(tmp_path: Path, capsys) -> None:
    from bertnmt.decoding.significance import paired_bootstrap
    from bertnmt.experiments.convergence_report import END, START, converged_table, update_doc

    refs = [f"ein hund spielt im park nummer {i}" for i in range(200)]
    weak = [r if i % 3 else "ein hund" for i, r in enumerate(refs)]
    strong = [r if i % 7 else "ein hund" for i, r in enumerate(refs)]
    for seed in (1, 2):
        _fake_run(tmp_path, "transformer", seed, 20.0 + seed)
        _hyps(tmp_path, "transformer", seed, refs, weak)
    _fake_run(tmp_path, "fused", 1, 25.0)
    _hyps(tmp_path, "fused", 1, refs, strong)
    jobs = [("transformer", 1), ("fused", 1), ("transformer", 2), ("fused", 2), ("dropnet_00", 1)]
    table = converged_table(tmp_path, jobs)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    expect = paired_bootstrap(refs, weak, strong, "de")["bleu"]
    assert expect["p_value"] < 0.01 and expect["system"] > expect["baseline"]
    fused = lines["BERT-fused: frozen, drop-net 1.0, warm start"]
    lo, hi = expect["system_ci"]
    assert (f"| warm start | 1/2 (s1) | 25.00 | 51.00 | +3.50 | +1.88 | 4/6 | {expect['p_value']:.3f} (s1) "
            f"| [{lo:.2f}, {hi:.2f}] (s1) |") in fused
    lo, hi = expect["baseline_ci"]  # the reference row's own interval
    assert (f"| continued | 2/2 (s1, s2) | 21.50 ± 0.71 | 51.50 ± 0.71 | +0.00 | +0.00 | 4/6, 4/6 | (reference) "
            f"| [{lo:.2f}, {hi:.2f}] (s1); [{lo:.2f}, {hi:.2f}] (s2) |") in lines["Transformer (no pretrained encoder)"]
    assert "| warm start | 0/1 | pending |" in lines["drop-net p_net = 0.0"]
    doc = tmp_path / "doc.md"
    doc.write_text(f"# x\n\n{START}\nold\n{END}\n\ntail\n")
    update_doc(doc, table)
    assert doc.read_text() == f"# x\n\n{START}\n{table}\n{END}\n\ntail\n"
    # the script rebuilds the same table into a document
    import importlib.util as iu

    spec = iu.spec_from_file_location("ablate_script", ROOT / "scripts" / "ablate.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc.write_text(f"# x\n\n{START}\nold\n{END}\n")
    rows = ",".join(f"{n}@{s}" for n, s in jobs)
    assert mod.main(["--report-only", "--converge", "--rows", rows, "--out", str(tmp_path), "--doc", str(doc)]) == 0
    assert doc.read_text() == f"# x\n\n{START}\n{table}\n{END}\n"
    assert "Pending: fused@2, dropnet_00@1." in (tmp_path / "converged.md").read_text()
    assert mod.main(["--report-only", "--out", str(tmp_path), "--doc", str(doc)]) == 2  # --doc needs --converge
    assert mod.main(["--report-only", "--converge", "--rows", rows, "--out", str(tmp_path / "none")]) == 2
    assert f"error: --out {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no <!-- converged-table:start"):
        update_doc(bare, table)


def test_an_unfinished_row_of_the_same_config_is_kept(tmp_path: Path) -> None:
    from bertnmt.experiments.ablation import is_resumable
    from bertnmt.train.rundir import save_config

    cfg = compose_row(ROW_BY_NAME["fused"], ["trainer=converge"], seed=2)
    d = row_dir(tmp_path, "fused", 2)
    d.mkdir(parents=True)
    assert not is_resumable(d, cfg)  # no config.yaml: nothing to continue
    cfg.output_dir = str(d)
    save_config(cfg, d)
    other = compose_row(ROW_BY_NAME["fused"], ["trainer=converge"], seed=2)  # output_dir differs: ignored
    assert is_resumable(d, other)
    assert not is_resumable(d, compose_row(ROW_BY_NAME["fused"], ["trainer=converge"], seed=3))
    assert not is_resumable(d, compose_row(ROW_BY_NAME["fused"], ["trainer=converge", "trainer.resume=never"], seed=2))


@pytest.mark.slow
def test_converged_sweep_is_killed_and_resumes_the_interrupted_row(tmp_path: Path, tiny_bert6: str, monkeypatch,
                                                                  caplog) -> None:
    import logging

    from bertnmt.train.trainer import Trainer

    custom = write_toy_corpus(tmp_path / "corpus")
    overrides = custom_overrides(custom) + [
        "model=tiny", f"bert.path={tiny_bert6}", "bert.name=tiny-bert", f"data.cache_dir={tmp_path / 'cache'}",
        "data.vocab_size=100", "data.max_tokens=400", "warm_start.max_epochs=1", "trainer.max_epochs=4",
        "trainer.progress=false", "trainer.tensorboard=false", "optim.warmup_steps=10", "optim.lr=3e-3", "eval.beam=2",
        # every epoch after the first counts as no improvement: each row stops after 1 + patience epochs
        "trainer.early_stop.min_delta=100", "trainer.early_stop.patience=1", "trainer.save_every_steps=3",
    ]
    out = tmp_path / "converged"
    rows = "transformer@1,fused@1,transformer@2"
    original = Trainer._save
    killed = []

    def save_then_die(self, epoch, pos, *args, **kwargs):
        path = original(self, epoch, pos, *args, **kwargs)
        if self.stage == "fused" and not pos.epoch_done and epoch == 2 and not killed:
            killed.append(self.step)
            raise KeyboardInterrupt  # the process dies right after a mid-epoch checkpoint
        return path

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(out, rows, overrides, launcher="inprocess", converge=True)
    assert killed and (row_dir(out, "transformer", 1) / "summary.json").is_file()
    fused_dir = row_dir(out, "fused", 1)
    assert not (fused_dir / "summary.json").exists()
    assert any((fused_dir / "checkpoints" / "fused").glob("checkpoint_*.pt"))
    assert not row_dir(out, "transformer", 2).exists()
    done = (row_dir(out, "transformer", 1) / "summary.json").stat().st_mtime_ns

    monkeypatch.setattr(Trainer, "_save", original)
    with caplog.at_level(logging.INFO):
        md = run_ablation(out, rows, overrides, launcher="inprocess", converge=True)
    log = caplog.text
    assert "row transformer seed 1: finished" in log and "row fused seed 1: unfinished folder" in log
    assert "[fused] resumed from" in log and f"step {killed[0]}" in log
    assert (row_dir(out, "transformer", 1) / "summary.json").stat().st_mtime_ns == done
    epochs = [json.loads(line) for line in (fused_dir / "results.jsonl").read_text().splitlines()]
    fused_epochs = [r["epoch"] for r in epochs if r.get("stage") == "fused" and "split" not in r]
    assert fused_epochs == [1, 2]  # stopped early after 1 + patience epochs, none recorded twice
    summary = json.loads((fused_dir / "summary.json").read_text())
    assert summary["fused"]["stop"] == "early_stop" and summary["fused"]["best_epoch"] == 1
    assert summary["fused"]["epochs"] == 2 and "reused_from" in summary["baseline"]
    table = (out / "converged.md").read_text()
    assert "All runs finished." in table and "| 2/2 (s1, s2) |" in table and "1/2 cap" not in table
    assert re.search(r"\| 1/1 \(s1\) \| \d+\.\d\d \| \d+\.\d\d \| [+-]\d+\.\d\d \| \+1\.88 \| 1/2 "
                     r"\| 0\.\d{3} \(s1\) \|", table)
    assert md.name == "ablations.md"

    # what git keeps of the folder (docs/results/.gitignore: no checkpoints, no corpus text) rebuilds the same table
    from bertnmt.experiments.convergence_report import converged_table

    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    names = "".join(f"docs/results/converged/{f.as_posix()}\n" for f in files)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input=names, cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    kept_files = [f for f in files if f"docs/results/converged/{f.as_posix()}" not in ignored]
    assert {f.name for f in kept_files} >= {"summary.json", "config.yaml", "meta.json", "results.jsonl",
                                             "test.transformer.hyp", "test.fused.hyp"}
    assert not any(f.name == "test.ref" or f.suffix in (".pt", ".safetensors", ".log") for f in kept_files)
    kept = tmp_path / "kept"
    for f in kept_files:
        (kept / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / f, kept / f)
    jobs = [("transformer", 1), ("fused", 1), ("transformer", 2)]
    assert converged_table(kept, jobs) == converged_table(out, jobs)


def test_a_failed_run_does_not_stop_the_sweep(tmp_path: Path, monkeypatch) -> None:
    import bertnmt.experiments.ablation as ablation
    from bertnmt.core.errors import TrainingError

    ran = []

    def fake(row, seed, out, overrides):
        ran.append((row.name, seed))
        if row.name == "finetune":
            raise TrainingError("5 non-finite losses in a row at step 7")
        _fake_run(out, row.name, seed, 20.0)

    monkeypatch.setattr(ablation, "_run_inprocess", fake)
    with pytest.raises(TrainingError, match=r"1 run\(s\) failed: finetune@1 \(5 non-finite"):
        run_ablation(tmp_path, "transformer@1,finetune@1,fused@1", launcher="inprocess", converge=True)
    assert ran == [("transformer", 1), ("finetune", 1), ("fused", 1)]
    assert "Pending: finetune@1." in (tmp_path / "converged.md").read_text()
