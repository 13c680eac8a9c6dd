"""The researcher's toolbox after training: export + load_model, evaluate, translate, checkpoint averaging."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

from bertnmt.train.averaging import average_checkpoints, last_checkpoints
from bertnmt.train.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from bertnmt.core.errors import CheckpointError, ConfigError, DataError
from bertnmt.inference.evaluate import evaluate
from bertnmt.inference.loading import load_model
from bertnmt.recipe.export import export_model
from bertnmt.recipe.pipeline import run
from bertnmt.inference.translator import format_hypotheses
from conftest import MIRROR_DIR
from tiny_encoders import make_encoder, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One toy fused run on Multi30k En->De (2 epochs, tiny BERT), shared by the tests of this module."""
    if not MIRROR_DIR.is_dir():
        pytest.skip(f"corpus mirror {MIRROR_DIR} is absent")
    tmp = tmp_path_factory.mktemp("tools")
    bert = make_encoder("bert", tmp / "bert")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERTNMT_MIRROR", str(MIRROR_DIR))
        cfg = tiny_config(tmp, [f"bert.path={bert}", "bert.name=tiny-bert", "trainer.max_epochs=2",
                                "data.test_limit=16", "eval.beam=3"], "run")
        summary = run(cfg)
    run_dir = Path(cfg.output_dir)
    records = [json.loads(line) for line in read(run_dir / "results.jsonl")]
    test = next(r for r in records if r.get("split") == "test")
    prepared = next(Path(cfg.data.cache_dir).resolve().glob("multi30k_en_de-en-de-*"))
    return {"cfg": cfg, "summary": summary, "run": run_dir, "bert": bert, "test": test, "tmp": tmp,
            "src": read(prepared / "test.src.txt"), "ref": read(prepared / "test.tgt.txt"),
            "hyps": read(run_dir / test["hypotheses"])}


# ---------------------------------------------------------------- export and load_model
def test_run_exports_its_final_model(trained: dict) -> None:
    export = trained["run"] / "export"
    assert trained["summary"]["export"] == str(export)
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "export.json", "model.safetensors", "spm.model"]
    weights = load_file(str(export / "model.safetensors"))
    best = load_checkpoint(trained["run"] / "checkpoints" / "fused" / "checkpoint_best.pt")["model"]
    assert set(weights) == set(best) and all(torch.equal(weights[k], best[k]) for k in best)
    assert not any(k.startswith("bert.") for k in weights)  # the frozen encoder is referenced, not copied
    info = json.loads((export / "export.json").read_text())
    assert info["encoder"]["path"] == trained["bert"] and len(info["encoder"]["weights_sha256"]) == 64
    assert info["stage"] == "fused" and info["vocab"]["sha256"] == load_checkpoint(
        trained["run"] / "checkpoints" / "fused" / "checkpoint_best.pt")["meta"]["vocab_sha256"]


def test_load_model_reproduces_the_pipelines_test_hypotheses(trained: dict) -> None:
    for source in (trained["run"] / "export", trained["run"] / "checkpoints" / "fused" / "checkpoint_best.pt",
                   trained["run"]):
        tr = load_model(source)
        assert tr.translate(trained["src"], beam=3) == trained["hyps"], source
    import bertnmt

    tr = bertnmt.load_model(str(trained["run"] / "export"))
    assert tr.translate([trained["src"][0]], beam=3, nbest=1) == trained["hyps"][:1]
    assert tr.translate(["", "  "]) == ["", ""]  # empty lines stay empty


def test_incomplete_export_and_another_encoder_are_refused(trained: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(trained["run"] / "export", broken)
    (broken / "spm.model").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete bertnmt export, missing spm\.model"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nothing")
    other = make_encoder("bert", tmp_path / "other_bert", seed=1)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="not the one this model was trained with"):
        load_model(trained["run"] / "export", bert_path=other)


def test_export_of_a_trained_encoder_includes_its_weights(trained: dict, tmp_path: Path) -> None:
    ckpt = load_checkpoint(trained["run"] / "checkpoints" / "fused" / "checkpoint_best.pt")
    from bertnmt.model.pretrained import PretrainedEncoder
    from bertnmt.core.config import BertConfig

    enc = PretrainedEncoder(BertConfig(path=trained["bert"]))
    torch.manual_seed(5)
    tuned = {f"bert.{k}": v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in enc.state_dict().items()}
    save_checkpoint(tmp_path / "tuned.pt", {**ckpt, "model": {**ckpt["model"], **tuned}})
    out = export_model(tmp_path / "tuned.pt", tmp_path / "tuned_export")
    weights = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("bert.") for k in weights)
    assert json.loads((out / "export.json").read_text())["encoder"]["weights_included"] is True
    tr = load_model(out)  # no hash check: the stored weights replace the encoder's
    for k, v in tuned.items():
        assert torch.equal(tr.model.state_dict()[k], v)


# ---------------------------------------------------------------- evaluate
def test_evaluate_a_split_matches_the_pipeline(trained: dict, tmp_path: Path) -> None:
    rec = evaluate(trained["run"] / "export", split="test", out=tmp_path / "ev", beam=3)
    assert rec["bleu"] == trained["test"]["bleu"] and rec["chrf"] == trained["test"]["chrf"]
    assert rec["bleu_signature"] == trained["test"]["bleu_signature"]
    assert read(tmp_path / "ev.hyp") == trained["hyps"]
    saved = json.loads((tmp_path / "ev.json").read_text())
    assert saved["bleu"] == rec["bleu"] and saved["hypotheses"] == "ev.hyp"
    assert saved["bleu_options"] == "sacreBLEU on detokenised text: tokenize='13a', case-sensitive"


def test_evaluate_paper_style_on_files(trained: dict, tmp_path: Path) -> None:
    from sacremoses import MosesTokenizer

    (tmp_path / "src.en").write_text("\n".join(trained["src"]) + "\n", encoding="utf-8")
    (tmp_path / "ref.de").write_text("\n".join(trained["ref"]) + "\n", encoding="utf-8")
    rec = evaluate(trained["run"] / "export", src=tmp_path / "src.en", ref=tmp_path / "ref.de", beam=3,
                   paper_style=True, out=tmp_path / "paper")
    moses = MosesTokenizer(lang="de")
    tok = lambda xs: [moses.tokenize(x, escape=False, return_str=True) for x in xs]  # noqa: E731
    direct = sacrebleu.corpus_bleu(tok(trained["hyps"]), [tok(trained["ref"])], tokenize="none", lowercase=True)
    assert rec["bleu"] == pytest.approx(round(direct.score, 2), abs=1e-9)
    assert rec["bleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:none")
    assert "Moses-tokenised by sacremoses" in rec["bleu_options"] and "lang='de'" in rec["bleu_options"]
    with pytest.raises(DataError, match="line counts differ"):
        (tmp_path / "short.de").write_text("eins\n", encoding="utf-8")
        evaluate(trained["run"] / "export", src=tmp_path / "src.en", ref=tmp_path / "short.de")


# ---------------------------------------------------------------- translate
def test_nbest_is_sorted_and_its_best_is_the_1best(trained: dict) -> None:
    tr = load_model(trained["run"] / "export")
    nbest = tr.translate_nbest(trained["src"][:4], beam=3, nbest=3)
    for hyps, best in zip(nbest, trained["hyps"][:4]):
        assert len(hyps) == 3 and hyps[0].text == best
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
    lines = format_hypotheses(7, "a source", nbest[0], "fairseq")
    assert lines[0] == "S-7\ta source" and lines[1] == f"H-7\t{nbest[0][0].score:.4f}\t{nbest[0][0].text}"
    assert format_hypotheses(7, "x", nbest[0], "tsv")[2].startswith("7\t3\t")
    with pytest.raises(ConfigError, match="nbest=4 must be between 1 and the beam size"):
        tr.translate_nbest(["x"], beam=3, nbest=4)


# ---------------------------------------------------------------- averaging
def _ckpt(path: Path, step: int, weights: dict[str, torch.Tensor]) -> Path:
    save_checkpoint(path, {"model": weights, "epoch": step // 10, "step": step, "meta": {"vocab_sha256": "a" * 64}})
    return path


def test_average_is_the_exact_elementwise_mean(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = {"w": torch.randn(3, 4), "b": torch.randn(4), "n": torch.tensor([7])}
    b = {"w": torch.randn(3, 4), "b": torch.randn(4), "n": torch.tensor([7])}
    out = average_checkpoints([_ckpt(tmp_path / "a.pt", 10, a), _ckpt(tmp_path / "b.pt", 20, b)], tmp_path / "avg.pt")
    avg = load_checkpoint(out)
    assert avg["format_version"] == FORMAT_VERSION and avg["step"] == 20
    for k in ("w", "b"):
        assert avg["model"][k].dtype == torch.float32
        assert torch.equal(avg["model"][k], ((a[k].double() + b[k].double()) / 2).float())
    assert torch.equal(avg["model"]["n"], a["n"])
    assert avg["meta"]["averaged_from"] == [str((tmp_path / "a.pt").resolve()), str((tmp_path / "b.pt").resolve())]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "avg.pt", "b.pt"]  # atomic: no temp files
    _ckpt(tmp_path / "c.pt", 30, {"w": torch.randn(3, 3), "b": torch.randn(4), "n": torch.tensor([7])})
    with pytest.raises(CheckpointError, match=r"w has shape \(3, 3\)"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "c.pt"], tmp_path / "bad.pt")


def test_last_checkpoints_are_ordered_by_step(tmp_path: Path) -> None:
    w = {"w": torch.zeros(2)}
    for step in (30, 10, 20):
        _ckpt(tmp_path / f"checkpoint_step{step}.pt", step, w)
    shutil.copyfile(tmp_path / "checkpoint_step30.pt", tmp_path / "checkpoint_last.pt")  # a copy counts once
    (tmp_path / "checkpoint_broken.pt").write_bytes(b"truncated")
    names = [p.name for p in last_checkpoints(tmp_path, 2)]
    assert names in (["checkpoint_step20.pt", "checkpoint_last.pt"], ["checkpoint_step20.pt", "checkpoint_step30.pt"])
    with pytest.raises(CheckpointError, match=r"3 checkpoints of distinct steps \(10, 20, 30\); asked for the last 4"):
        last_checkpoints(tmp_path, 4)


def test_evaluate_accepts_an_averaged_checkpoint(trained: dict, tmp_path: Path) -> None:
    ckdir = trained["run"] / "checkpoints" / "fused"
    best = ckdir / "checkpoint_best.pt"
    avg = average_checkpoints([best, best], tmp_path / "avg.pt")  # the mean of x and x is x, exactly
    rec = evaluate(avg, split="test", beam=3, out=tmp_path / "avg_eval")
    assert rec["bleu"] == trained["test"]["bleu"]
    two = average_checkpoints(last_checkpoints(trained["run"], 2), tmp_path / "avg2.pt")
    assert evaluate(two, split="test", beam=3, out=tmp_path / "avg2_eval")["n"] == len(trained["src"])


# ---------------------------------------------------------------- the scripts
def script_main(name: str):
    """``main(argv)`` of scripts/<name>, imported in-process (the scripts are thin argparse wrappers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_scripts_print_scores_and_one_line_errors(trained: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    export = str(trained["run"] / "export")
    script_main("evaluate")([export, "--beam", "3", "--paper-style", "--out", str(tmp_path / "e")])
    printed = capsys.readouterr().out
    assert "BLEU options: paper style" in printed and "BLEU signature: nrefs:1|case:lc|eff:no|tok:none" in printed
    assert (tmp_path / "e.hyp").is_file() and (tmp_path / "e.json").is_file()

    avg = tmp_path / "avg.pt"
    script_main("average_checkpoints")([str(trained["run"]), "--last", "1", "--out", str(avg)])
    assert avg.is_file() and "averaged 1 checkpoints" in capsys.readouterr().out
    script_main("export")([str(avg), str(tmp_path / "avg_export")])
    assert (tmp_path / "avg_export" / "model.safetensors").is_file()

    for name, args, msg in [
        ("evaluate", [str(tmp_path / "missing")], "error: "),
        ("evaluate", [export, "--split", "dev"], "error: split 'dev' is not one of train, valid, test"),
        ("translate", [export, "--beam", "2", "--nbest", "3"], "error: nbest=3 must be between 1 and the beam size (2)"),
        ("translate", [export, "-i", str(tmp_path / "no.txt")], "no.txt: file not found"),
        ("average_checkpoints", [str(trained["run"]), "--last", "9", "--out", str(tmp_path / "x.pt")],
         "asked for the last 9"),
        ("export", [str(tmp_path / "nothing.pt"), str(tmp_path / "x")], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            script_main(name)(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)


def test_translate_reads_stdin(trained: dict, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(trained["src"][:2]) + "\n"))
    script_main("translate")([str(trained["run"] / "export"), "--beam", "3", "--nbest", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0] == f"S-0\t{trained['src'][0]}" and lines[1].startswith("H-0\t")
    assert lines[1].split("\t")[2] == trained["hyps"][0] and lines[3] == f"S-1\t{trained['src'][1]}"


@pytest.mark.slow
def test_translate_is_interactive_on_a_terminal(trained: dict) -> None:
    import pty
    import select

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "scripts/translate.py", str(trained["run"] / "export"), "--beam", "3"],
                            cwd=ROOT, env=env, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    try:
        os.write(master, (trained["src"][0] + "\n").encode())
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no translation within 120 s"
        assert proc.stdout.readline().rstrip("\n") == trained["hyps"][0]
        os.write(master, b"\x04")  # Ctrl-D: end of input
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert "type a sentence" in proc.stderr.read()
