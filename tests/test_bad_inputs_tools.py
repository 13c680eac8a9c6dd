"""Every bad input of the tools after training (evaluate, translate, export, average_checkpoints) through the
real command line, in a subprocess: exit code 2, exactly one ``error: ...`` line on stderr naming the file,
line, option or value, no traceback, and no file created, changed or deleted. A few rows are inputs that
are accepted and said (CR line endings, a closed output pipe, replacing an earlier export): they check
what came out instead.

The model is a random tiny Transformer exported without training (``tests/tool_model.py``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from omegaconf import OmegaConf

from bertnmt.train.checkpoint import load_checkpoint, save_checkpoint
from tool_model import make_run
from train_cli import ROOT, train_env

Done = subprocess.CompletedProcess


@dataclass
class Row:
    """One command: ``scripts/<script>.py args`` with ``stdin``; ``error`` is the start of the one stderr line
    (None: the command succeeds), ``check`` looks at the outcome (files, stdout)."""

    script: str
    args: list[str]
    error: str | None = None
    stdin: bytes = b""
    cwd: Path = ROOT
    code: int = 2
    check: Callable[[Done], None] | None = None
    close_stdout_after: int | None = None  # read this many lines, then close the pipe (``| head -N``)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool_model")
    run = make_run(root)
    return {"root": root, "run": run, "export": run / "export", "ckpt": run / "checkpoints" / "baseline" / "checkpoint_best.pt",
            "corpus": root / "corpus"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its content hash and mode."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16] + oct(p.stat().st_mode)
        else:
            out[rel] = "dir"
    return out


def copy_export(tmp: Path, m: dict[str, Path], **data: object) -> Path:
    """A copy of the export whose config.yaml has ``data.<key>`` set (e.g. the test files of its corpus)."""
    out = tmp / "export"
    shutil.copytree(m["export"], out)
    cfg = OmegaConf.load(out / "config.yaml")
    for key, value in data.items():
        OmegaConf.update(cfg, f"data.{key}", value, force_add=True)
    OmegaConf.save(cfg, out / "config.yaml")
    return out


def edit_config(tmp: Path, m: dict[str, Path], old: str, new: str) -> Path:
    out = tmp / "export"
    shutil.copytree(m["export"], out)
    text = (out / "config.yaml").read_text()
    assert old in text
    (out / "config.yaml").write_text(text.replace(old, new))
    return out


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


# ---------------------------------------------------------------- silent damage
def cr_test_split(tmp: Path, m: dict[str, Path]) -> Row:
    """A test split with CR-only line endings is 5 sentences, not one merged line, and a warning says so."""
    test = {}
    for side, lang in (("src", "en"), ("tgt", "de")):
        path = tmp / f"test_cr.{lang}"
        path.write_bytes((m["corpus"] / f"test.{lang}").read_bytes().replace(b"\n", b"\r"))
        test[side] = str(path)
    export = copy_export(tmp, m, **{"custom.test": test, "cache_dir": str(tmp / "cache")})

    def check(done: Done) -> None:
        assert "test: 5 sentences" in done.stdout
        assert len(lines_of(tmp / "ev.hyp")) == 5
        assert "test_cr.en: 5 carriage return(s) without a line feed read as line breaks" in done.stderr
    return Row("evaluate", [str(export), "--split", "test", "--out", str(tmp / "ev")], check=check, code=0)


def cr_src_ref(tmp: Path, m: dict[str, Path]) -> Row:
    """CRLF and CR-only --src/--ref files: one hypothesis per line of the user's file."""
    (tmp / "s.en").write_bytes((m["corpus"] / "test.en").read_bytes().replace(b"\n", b"\r\n"))
    (tmp / "r.de").write_bytes((m["corpus"] / "test.de").read_bytes().replace(b"\n", b"\r"))

    def check(done: Done) -> None:
        assert "s.en: 5 sentences" in done.stdout and len(lines_of(tmp / "ev.hyp")) == 5
        warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
        assert len(warnings) == 1 and "r.de: 5 carriage return(s)" in warnings[0]  # CRLF is not worth a warning
    return Row("evaluate", [str(m["export"]), "--src", str(tmp / "s.en"), "--ref", str(tmp / "r.de"),
                            "--out", str(tmp / "ev")], check=check, code=0)


def empty_test_line(tmp: Path, m: dict[str, Path]) -> Row:
    """An empty line inside a test file would shift every later hypothesis against the file: refused."""
    src = tmp / "test.en"
    lines = lines_of(m["corpus"] / "test.en")
    lines[2] = "  "
    src.write_text("".join(line + "\n" for line in lines) + "\n", encoding="utf-8")  # a trailing blank line is fine
    tgt = tmp / "test.de"
    tgt.write_text((m["corpus"] / "test.de").read_text() + "\n", encoding="utf-8")
    export = copy_export(tmp, m, **{"custom.test": {"src": str(src), "tgt": str(tgt)}, "cache_dir": str(tmp / "cache")})
    return Row("evaluate", [str(export), "--split", "test", "--out", str(tmp / "ev")],
               f"error: {src}: line 3 is empty; the hypotheses of a valid or test split must stay aligned")


def limit_minus_one(tmp: Path, m: dict[str, Path]) -> Row:
    return Row("evaluate", [str(m["export"]), "--limit", "-1", "--out", str(tmp / "ev")],
               "error: --limit -1: must be 0 (every sentence) or a positive number of sentences")


def user_folder(tmp: Path, m: dict[str, Path]) -> Row:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("months of work")
    return Row("export", [str(m["run"]), str(tmp / "mine")],
               f"error: {tmp / 'mine'}: not empty and not an earlier bertnmt export (it holds 'thesis.tex'); "
               "export into a new or empty folder")


def copy_run(tmp: Path, m: dict[str, Path]) -> Path:
    run = tmp / "runs" / "run"
    shutil.copytree(m["run"], run)
    return run


def run_into_itself(tmp: Path, m: dict[str, Path]) -> Row:
    run = copy_run(tmp, m)
    return Row("export", [str(run), str(run)], f"error: {run}: is the run folder of {run}; export into a new folder")


def run_into_dot(tmp: Path, m: dict[str, Path]) -> Row:
    run = copy_run(tmp, m)
    return Row("export", [str(run), "."], f"error: .: is the run folder of {run}", cwd=run)


def run_into_parent(tmp: Path, m: dict[str, Path]) -> Row:
    run = copy_run(tmp, m)
    return Row("export", [str(run), str(run.parent)], f"error: {run.parent}: is a folder above the run of {run}")


def replace_export(tmp: Path, m: dict[str, Path]) -> Row:
    """An earlier export is replaced; a file it holds that export did not write is kept; files are 0644."""
    run = copy_run(tmp, m)
    (run / "export" / "eval.model.test.beam2.json").write_text("{}")

    def check(done: Done) -> None:
        export = run / "export"
        names = sorted(p.name for p in export.iterdir())
        assert names == ["config.yaml", "eval.model.test.beam2.json", "export.json", "model.safetensors", "spm.model"]
        assert (export / "eval.model.test.beam2.json").read_text() == "{}"
        assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "export"]  # no temp folders
        mode = 0o666 & ~umask()  # 0644 under the usual umask 022, not safetensors' 0600
        for name in names:
            assert stat.S_IMODE((export / name).stat().st_mode) == mode, name
        assert "kept 1 file(s) of the earlier export" in done.stderr
    return Row("export", [str(run), str(run / "export")], check=check, code=0)


# ---------------------------------------------------------------- tracebacks before
def stdin_not_utf8(tmp: Path, m: dict[str, Path]) -> Row:
    def check(done: Done) -> None:
        assert len(done.stdout.splitlines()) == 2  # lines 1 and 2 are translated, then it stops
    return Row("translate", [str(m["export"]), "--buffer", "8"],
               "error: stdin: line 3 is not valid UTF-8 (byte 0xe9); the 2 line(s) before it were translated",
               stdin=b"the cat sees a dog\na red car\ncaf\xe9 au lait\nthe tree\n", check=check)


def file_not_utf8(tmp: Path, m: dict[str, Path]) -> Row:
    (tmp / "in.en").write_bytes(b"the cat\r\na dog\r\ncaf\xe9\r\n")

    def check(done: Done) -> None:
        assert done.stdout == ""  # a file is checked whole before anything is translated
    return Row("translate", [str(m["export"]), "-i", str(tmp / "in.en")],
               f"error: {tmp / 'in.en'}: line 3 is not valid UTF-8 (byte 0xe9)", check=check)


def stdin_cr(tmp: Path, m: dict[str, Path]) -> Row:
    def check(done: Done) -> None:
        assert len(done.stdout.splitlines()) == 3
    return Row("translate", [str(m["export"])], stdin=b"the cat\ra dog\r\nthe tree\r", check=check, code=0)


def closed_pipe(tmp: Path, m: dict[str, Path]) -> Row:
    """``translate.py | head -1``: quiet, exit 141 (128 + SIGPIPE) like coreutils."""
    def check(done: Done) -> None:
        assert done.stderr == ""
    return Row("translate", [str(m["export"]), "--buffer", "1"], stdin=b"the cat sees a dog\n" * 3000, code=141,
               check=check, close_stdout_after=1)


def limit_minus_five(tmp: Path, m: dict[str, Path]) -> Row:
    return Row("evaluate", [str(m["export"]), "--limit", "-5", "--out", str(tmp / "ev")], "error: --limit -5: must be 0")


def empty_src(tmp: Path, m: dict[str, Path]) -> Row:
    (tmp / "empty.en").write_text("")
    return Row("evaluate", [str(m["export"]), "--src", str(tmp / "empty.en"), "--out", str(tmp / "ev")],
               f"error: {tmp / 'empty.en'}: empty file, nothing to translate")


def empty_ref(tmp: Path, m: dict[str, Path]) -> Row:
    (tmp / "empty.de").write_text("")
    src = m["corpus"] / "test.en"
    return Row("evaluate", [str(m["export"]), "--src", str(src), "--ref", str(tmp / "empty.de"), "--out", str(tmp / "ev")],
               f"error: line counts differ: {src} has 5 lines, {tmp / 'empty.de'} has 0")


def unknown_tokenize(tmp: Path, m: dict[str, Path]) -> Row:
    return Row("evaluate", [str(m["export"]), "--tokenize", "moses", "--out", str(tmp / "ev")],
               "error: --tokenize 'moses' is not a sacreBLEU tokenizer; choose one of none, zh, 13a")


def out_under_file(tmp: Path, m: dict[str, Path]) -> Row:
    (tmp / "a_file").write_text("not a folder")
    return Row("evaluate", [str(m["export"]), "--out", str(tmp / "a_file" / "ev")],
               f"error: --out={tmp / 'a_file'}: cannot create the output folder, {tmp / 'a_file'} is not a folder")


def config_d_model_text(tmp: Path, m: dict[str, Path]) -> Row:
    export = edit_config(tmp, m, "d_model: 32", "d_model: wide")
    return Row("translate", [str(export)], f"error: {export / 'config.yaml'}: not a valid config (Value 'wide' of type "
               "'str' could not be converted to Integer (key model.d_model))", stdin=b"the cat\n")


def config_d_model_odd(tmp: Path, m: dict[str, Path]) -> Row:
    export = edit_config(tmp, m, "d_model: 32", "d_model: 33")
    return Row("translate", [str(export)], f"error: {export / 'config.yaml'}: its model section describes no model "
               "that can be built (ValueError: d_model=33 is not divisible by heads=2)", stdin=b"the cat\n")


def config_d_model_other(tmp: Path, m: dict[str, Path]) -> Row:
    export = edit_config(tmp, m, "d_model: 32", "d_model: 64")
    return Row("evaluate", [str(export), "--out", str(tmp / "ev")],
               f"error: {export / 'config.yaml'}: the model it describes does not fit the weights (checkpoint {export}: ")


def config_not_yaml(tmp: Path, m: dict[str, Path]) -> Row:
    export = edit_config(tmp, m, "d_model: 32", "d_model: [32")
    return Row("translate", [str(export)], f"error: {export / 'config.yaml'}: not a valid config (while parsing a flow "
               "sequence", stdin=b"the cat\n")


# ---------------------------------------------------------------- averaging
def other_checkpoint(tmp: Path, m: dict[str, Path], meta: dict | None = None, model: dict | None = None) -> Path:
    ckpt = load_checkpoint(m["ckpt"])
    ckpt["meta"] = {**ckpt["meta"], **(meta or {})}
    ckpt["model"] = {**ckpt["model"], **(model or {})}
    ckpt["step"] = 20
    path = tmp / "other.pt"
    save_checkpoint(path, ckpt)
    return path


def average_other_vocab(tmp: Path, m: dict[str, Path]) -> Row:
    other = other_checkpoint(tmp, m, meta={"vocab_sha256": "b" * 64})
    return Row("average_checkpoints", [str(m["ckpt"]), str(other), "--out", str(tmp / "avg.pt")],
               f"error: {other} was trained with another vocabulary than {m['ckpt']} (SentencePiece sha256 bbbbbbbbbbbb vs ")


def average_other_config(tmp: Path, m: dict[str, Path]) -> Row:
    model = load_checkpoint(m["ckpt"])["meta"]["model"]
    other = other_checkpoint(tmp, m, meta={"model": {**model, "pre_ln": True}})  # same tensors, another model
    return Row("average_checkpoints", [str(m["ckpt"]), str(other), "--out", str(tmp / "avg.pt")],
               f"error: {other} has model.pre_ln=True, {m['ckpt']} has False; checkpoints of different models cannot be averaged")


def average_other_shapes(tmp: Path, m: dict[str, Path]) -> Row:
    weights = load_checkpoint(m["ckpt"])["model"]
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    other = other_checkpoint(tmp, m, model={key: torch.zeros(weights[key].shape[0] + 4, weights[key].shape[1])})
    return Row("average_checkpoints", [str(m["ckpt"]), str(other), "--out", str(tmp / "avg.pt")],
               f"error: {other}: {key} has shape ({weights[key].shape[0] + 4}, 32)")


def average_onto_input(tmp: Path, m: dict[str, Path]) -> Row:
    other = other_checkpoint(tmp, m)
    return Row("average_checkpoints", [str(m["ckpt"]), str(other), "--out", str(other)],
               f"error: --out {other} is one of the checkpoints to average")


ROWS = {
    "CR-only valid/test files (custom corpus)": cr_test_split,
    "CRLF / CR-only --src and --ref": cr_src_ref,
    "empty line inside a test file": empty_test_line,
    "evaluate --limit -1": limit_minus_one,
    "export into a folder of the user's": user_folder,
    "export RUN RUN": run_into_itself,
    "export RUN .": run_into_dot,
    "export RUN PARENT": run_into_parent,
    "export over an earlier export": replace_export,
    "translate: stdin not UTF-8": stdin_not_utf8,
    "translate: -i file not UTF-8": file_not_utf8,
    "translate: stdin with CR line breaks": stdin_cr,
    "translate | head -1": closed_pipe,
    "evaluate --limit -5": limit_minus_five,
    "evaluate: empty --src": empty_src,
    "evaluate: empty --ref": empty_ref,
    "evaluate: unknown --tokenize": unknown_tokenize,
    "evaluate: --out under a file": out_under_file,
    "export's config.yaml: d_model not a number": config_d_model_text,
    "export's config.yaml: d_model not divisible by heads": config_d_model_odd,
    "export's config.yaml: d_model of other weights": config_d_model_other,
    "export's config.yaml: not YAML": config_not_yaml,
    "average: another vocabulary": average_other_vocab,
    "average: another model config, same shapes": average_other_config,
    "average: other shapes": average_other_shapes,
    "average: --out is an input": average_onto_input,
}


def run_row(row: Row) -> Done:
    cmd = [sys.executable, str(ROOT / "scripts" / f"{row.script}.py"), *row.args]
    env = train_env()
    if row.close_stdout_after is None:
        return subprocess.run(cmd, cwd=row.cwd, env=env, input=row.stdin, capture_output=True, timeout=300)
    with tempfile.TemporaryFile() as stdin:
        stdin.write(row.stdin)
        stdin.seek(0)
        proc = subprocess.Popen(cmd, cwd=row.cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = [proc.stdout.readline() for _ in range(row.close_stdout_after)]
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    code = proc.wait(timeout=300)
    return subprocess.CompletedProcess(cmd, code, b"".join(head), err)


@pytest.mark.parametrize("name", list(ROWS))
def test_tool_input(name: str, tmp_path: Path, model: dict[str, Path]) -> None:
    row = ROWS[name](tmp_path, model)
    before, shared = snapshot(tmp_path), snapshot(model["root"])
    done = run_row(row)
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    done = subprocess.CompletedProcess(done.args, done.returncode, out, err)
    assert "Traceback" not in out + err, err
    assert done.returncode == (2 if row.error else row.code), err
    if row.error:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(row.error), err
        assert snapshot(tmp_path) == before  # nothing written, changed or deleted
    assert snapshot(model["root"]) == shared
    if row.check:
        row.check(done)
