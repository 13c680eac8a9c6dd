"""Every bad input through the real command line (scripts/train.py in a subprocess): exit code 2, exactly one
``error: ...`` line on stderr naming the file, key or value, no traceback, and no half-written outputs.
Empty lines and over-long sentences are not errors: they are dropped / truncated and counted."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from bertnmt.train.checkpoint import model_weights, save_checkpoint
from bertnmt.core.config import ModelConfig
from bertnmt.model.nmt import BertFusedTransformer
from tiny_encoder import make_tiny_bert
from train_cli import run_train

Files = dict[str, Path]  # "train.src" -> path, ...
Result = tuple[list[str], str]  # (overrides, the expected start of the error line)
WORDS = "the a cat dog man woman sees likes runs to house red big small green tree car bird".split()


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


def write_corpus(root: Path, n: int = 20) -> dict[str, Path]:
    rng = random.Random(1)
    files = {}
    for split in ("train", "valid", "test"):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n if split == "train" else 6)]
        for side, lang in (("src", "en"), ("tgt", "de")):
            path = root / f"{split}.{lang}"
            path.write_text("".join(line[::-1 if side == "tgt" else 1] + "\n" for line in lines), encoding="utf-8")
            files[f"{split}.{side}"] = path
    return files


class Case:
    """One bad input: ``setup(tmp, files, bert)`` changes files and returns extra overrides and the expected message.

    ``after(tmp, files)`` checks what the refused run must have left alone; ``slow`` rows train a model first.
    """

    def __init__(self, setup: Callable[[Path, Files, str], Result], plain: bool = True,
                 after: Callable[[Path, Files], None] | None = None, slow: bool = False) -> None:
        self.setup, self.plain, self.after, self.slow = setup, plain, after, slow


def save_plain(path: Path, d_model: int = 32, vocab: int = 60, sha: str | None = None) -> Path:
    cfg = ModelConfig(d_model=d_model, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, fused=False)
    model = BertFusedTransformer(cfg, vocab, 0, None)
    save_checkpoint(path, {"model": model_weights(model, include_bert=False), "meta": {"vocab_sha256": sha} if sha else {}})
    return path


def missing_file(tmp: Path, files: Files, bert: str) -> Result:
    return [f"data.custom.train.src={tmp}/nope.en"], f"error: {tmp}/nope.en: file not found (data.custom.train.src)"


def line_counts(tmp: Path, files: Files, bert: str) -> Result:
    tgt = files["train.tgt"]
    tgt.write_text("".join(tgt.read_text().splitlines(keepends=True)[:-1]))
    return [], f"error: line counts differ: {files['train.src']} has 20 lines, {tgt} has 19"


def empty_corpus(tmp: Path, files: Files, bert: str) -> Result:
    files["train.src"].write_text("")
    files["train.tgt"].write_text("")
    return [], f"error: {files['train.src']} and {files['train.tgt']} hold no sentence pairs"


def not_utf8(tmp: Path, files: Files, bert: str) -> Result:
    lines = files["train.src"].read_bytes().split(b"\n")
    lines[2] = b"caf\xe9 au lait"  # Latin-1, line 3
    files["train.src"].write_bytes(b"\n".join(lines))
    return [], f"error: {files['train.src']}: line 3 is not valid UTF-8 (byte 0xe9)"


def encoder_offline(tmp: Path, files: Files, bert: str) -> Result:
    return ["bert.path=nobody/no-such-encoder"], \
        "error: pretrained encoder 'nobody/no-such-encoder' is not available offline"


def unknown_key(tmp: Path, files: Files, bert: str) -> Result:
    return ["model.d_modle=64"], "error: model.d_modle=64: model has no key 'd_modle'; did you mean model.d_model?"


def unknown_option(tmp: Path, files: Files, bert: str) -> Result:
    return ["model=huge"], \
        "error: In 'config': Could not find 'model/huge'; Available options in 'model': base, iwslt, small, tiny"


def bad_value(tmp: Path, files: Files, bert: str) -> Result:
    return ["trainer.max_epochs=many"], ("error: Error merging override trainer.max_epochs=many; "
                                         "Value 'many' of type 'str' could not be converted to Integer")


def bad_freeze_rule(tmp: Path, files: Files, bert: str) -> Result:
    return ["freeze=rules", "freeze.rules=[{match: 'decoder.layerz.*'}]"], \
        "error: freeze.rules[0].match='decoder.layerz.*' matches no parameter"


def overlapping_rules(tmp: Path, files: Files, bert: str) -> Result:
    rules = "[{match: 'group:encoder', end: 3}, {match: 'group:encoder', frozen: false, start: 2}]"
    return ["freeze=rules", f"freeze.rules={rules}"], ("error: freeze.rules[0] (group:encoder frozen [1, 3)) and "
                                                      "freeze.rules[1] (group:encoder trains [2, inf)) contradict each other")


def warm_other_vocab(tmp: Path, files: Files, bert: str) -> Result:
    path = save_plain(tmp / "plain.pt", sha="b" * 64)
    return [f"warm_start.path={path}"], \
        f"error: warm-start checkpoint {path} was trained with another vocabulary (SentencePiece sha256 bbbbbbbbbbbb vs"


def warm_other_dims(tmp: Path, files: Files, bert: str) -> Result:
    path = save_plain(tmp / "plain.pt", d_model=48)
    return [f"warm_start.path={path}"], \
        f"error: warm-start checkpoint {path}: embed_tokens.weight has shape (60, 48) but the model expects ("


def other_format_version(tmp: Path, files: Files, bert: str) -> Result:
    path = tmp / "old.pt"
    torch.save({"format_version": 0, "model": {}}, path)
    return [f"trainer.resume={path}"], f"error: checkpoint {path} has format version 0; this bertnmt reads version 1"


def truncated_checkpoint(tmp: Path, files: Files, bert: str) -> Result:
    path = save_plain(tmp / "plain.pt")
    path.write_bytes(path.read_bytes()[:5000])
    return [f"trainer.resume={path}"], f"error: checkpoint {path} cannot be read: truncated or corrupt"


def bad_resume_value(tmp: Path, files: Files, bert: str) -> Result:
    return ["trainer.resume=sometimes"], "error: trainer.resume='sometimes' is neither auto, never nor a checkpoint file"


def unwritable_output(tmp: Path, files: Files, bert: str) -> Result:
    (tmp / "a_file").write_text("not a folder")
    return [f"hydra.run.dir={tmp}/a_file/run"], \
        f"error: hydra.run.dir={tmp}/a_file/run: cannot create the output folder, {tmp}/a_file is not a folder"


def mirror_checksum(tmp: Path, files: Files, bert: str) -> Result:
    bad = tmp / "mirror" / "multi30k" / "train.en.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(gzip.compress(b"a tampered corpus\n", mtime=0))
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    expected = "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"
    return ["data=multi30k_en_de", f"data.mirror={tmp}/mirror"], \
        f"error: {bad}: sha256 mismatch, expected {expected}, got {actual}"


def no_tokenizer_files(tmp: Path, files: Files, bert: str) -> Result:
    folder = tmp / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):  # the weights, none of the tokenizer's files
        shutil.copy(Path(bert) / name, folder / name)
    return [f"bert.path={folder}"], (f"error: bert.path='{folder}': its tokenizer has only 5 tokens but the encoder's "
                                     "embedding table has 30522 rows; its tokenizer files")


def plus_typo(tmp: Path, files: Files, bert: str) -> Result:
    return ["+trainer.max_epoch=5"], "error: +trainer.max_epoch=5: trainer has no key 'max_epoch'; did you mean trainer.max_epochs?"


def plus_unknown(tmp: Path, files: Files, bert: str) -> Result:
    return ["+foo=1"], "error: +foo=1: the config has no key 'foo'"


def value(key: str, val: str, message: str) -> Callable[[Path, Files, str], Result]:
    return lambda tmp, files, bert: ([f"{key}={val}"], f"error: {message}")


def cuda_missing(tmp: Path, files: Files, bert: str) -> Result:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["trainer.device=cuda"], "error: trainer.device=cuda: CUDA is not available on this machine"


def read_only_cache(tmp: Path, files: Files, bert: str) -> Result:
    cache = tmp / "ro_cache"
    cache.mkdir()
    if os.geteuid() != 0:
        cache.chmod(0o555)
    elif subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(cache)], capture_output=True).returncode == 0:
        CLEANUP.append(lambda: subprocess.run(["umount", str(cache)], capture_output=True))
    else:
        pytest.skip("root can write into a read-only folder, and cannot mount one read-only here")
    return [f"data.cache_dir={cache}"], \
        f"error: data.cache_dir={cache}: cannot create the output folder, {cache} is not writable"


def averaged_resume(tmp: Path, files: Files, bert: str) -> Result:
    path = tmp / "averaged.pt"
    cfg = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, fused=False)
    weights = model_weights(BertFusedTransformer(cfg, 60, 0, None), include_bert=False)
    save_checkpoint(path, {"model": weights, "stage": "baseline", "epoch": 1, "step": 4,
                           "meta": {"averaged_from": ["a.pt", "b.pt"]}})
    return [f"trainer.resume={path}"], \
        f"error: trainer.resume={path}: an average of checkpoints holds no training state"


def data_edited_before_resume(tmp: Path, files: Files, bert: str) -> Result:
    """A run with checkpoints but no summary (a crash), a training line edited, the same command again."""
    args = overridden(base_args(tmp, files, bert, plain=True), [f"hydra.run.dir={tmp}/first"])
    first = run_train(args, BERTNMT_MIRROR="")
    assert first.returncode == 0, first.stderr
    (tmp / "first" / "summary.json").unlink()
    EARLIER["meta"] = (tmp / "first" / "meta.json").read_bytes()
    lines = files["train.src"].read_text().splitlines()
    lines[5] = "the big red tree sees a small green car"
    files["train.src"].write_text("".join(line + "\n" for line in lines))
    return [], f"error: {files['train.src']} (data.custom.train.src) changed since the run in {tmp}/first started"


def earlier_run_intact(tmp: Path, files: Files) -> None:
    first = tmp / "first"
    assert (first / "meta.json").read_bytes() == EARLIER["meta"]  # not overwritten with the new data's
    assert (first / "checkpoints" / "baseline" / "checkpoint_last.pt").is_file()
    assert (first / "train.log").is_file() and (first / ".hydra").is_dir() and not (first / ".lock").exists()


EARLIER: dict[str, bytes] = {}
CLEANUP: list[Callable[[], object]] = []


CASES = {
    "missing data file": Case(missing_file),
    "line counts differ": Case(line_counts),
    "empty corpus": Case(empty_corpus),
    "bytes not UTF-8": Case(not_utf8),
    "encoder not available offline": Case(encoder_offline, plain=False),
    "unknown key": Case(unknown_key),
    "unknown group option": Case(unknown_option),
    "value of the wrong type": Case(bad_value),
    "freeze rule matching nothing": Case(bad_freeze_rule),
    "contradicting freeze rules": Case(overlapping_rules),
    "warm start of another vocabulary": Case(warm_other_vocab, plain=False),
    "warm start of other dimensions": Case(warm_other_dims, plain=False),
    "checkpoint of another format version": Case(other_format_version),
    "truncated checkpoint": Case(truncated_checkpoint),
    "unknown trainer.resume": Case(bad_resume_value),
    "output folder not writable": Case(unwritable_output),
    "mirror file with another checksum": Case(mirror_checksum),
    "encoder folder without tokenizer files": Case(no_tokenizer_files, plain=False),
    "+key misspelt": Case(plus_typo),
    "+key outside the schema": Case(plus_unknown),
    "heads not dividing d_model": Case(value("model.heads", "3", "model.heads=3 must divide model.d_model=32")),
    "zero d_model": Case(value("model.d_model", "0", "model.d_model=0 must be at least 1")),
    "negative learning rate": Case(value("optim.lr", "-1", "optim.lr=-1.0 must be positive")),
    "beam of zero": Case(value("eval.beam", "0", "eval.beam=0 must be at least 1")),
    "zero epochs": Case(value("trainer.max_epochs", "0", "trainer.max_epochs=0 must be at least 1")),
    "zero accumulation steps": Case(value("trainer.accum_steps", "0", "trainer.accum_steps=0 must be at least 1")),
    "CUDA device without CUDA": Case(cuda_missing),
    "read-only data cache": Case(read_only_cache),
    "resume from an averaged checkpoint": Case(averaged_resume),
    "data edited before a resume": Case(data_edited_before_resume, after=earlier_run_intact, slow=True),
}


@pytest.fixture(autouse=True)
def cleanup() -> Iterator[None]:
    yield
    while CLEANUP:
        CLEANUP.pop()()


def base_args(tmp: Path, files: dict[str, Path], bert: str, plain: bool) -> list[str]:
    return ["model=tiny", f"bert.path={bert}", "data=custom", *(f"data.custom.{k}={v}" for k, v in files.items()),
            f"data.cache_dir={tmp}/cache", "data.vocab_size=60", "data.max_tokens=300", "trainer.max_epochs=1",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.valid_bleu=false", "trainer.device=cpu",
            "eval.test=false", f"hydra.run.dir={tmp}/run", *(["model.fused=false"] if plain else [])]


def overridden(base: list[str], extra: list[str]) -> list[str]:
    """``base`` without the keys (and groups) that ``extra`` sets, then ``extra``."""
    keys = {e.split("=", 1)[0] for e in extra}
    drop = lambda a: a.split("=", 1)[0] in keys or ("data" in keys and a.startswith("data.custom."))  # noqa: E731
    return [a for a in base if not drop(a)] + extra


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if c.slow else []) for n, c in CASES.items()])
def test_bad_input_is_one_clear_line(name: str, tmp_path: Path, bert: str) -> None:
    case = CASES[name]
    files = write_corpus(tmp_path)
    extra, expected = case.setup(tmp_path, files, bert)
    out = run_train(overridden(base_args(tmp_path, files, bert, case.plain), extra), BERTNMT_MIRROR="")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith(expected), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    run = tmp_path / "run"
    left = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
    assert set(left) <= {".hydra", "train.log"}, left  # no config, meta, results, checkpoints or summary
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.name.startswith(".tmp")]  # no half-prepared data
    if case.after is not None:
        case.after(tmp_path, files)


def empty_lines(tmp: Path, files: dict[str, Path]) -> tuple[list[str], Callable[[dict], None]]:
    src, tgt = (files[f"train.{side}"].read_text().splitlines() for side in ("src", "tgt"))
    src[0] = src[4] = tgt[4] = ""  # pairs 1 and 5
    tgt[7] = "   "  # pair 8: blank after stripping
    for side, lines in (("src", src), ("tgt", tgt)):
        files[f"train.{side}"].write_text("".join(line + "\n" for line in lines))

    def check(report: dict, tmp: Path) -> None:
        assert report["dropped_empty"] == {"train": 3, "valid": 0, "test": 0}
        assert report["pairs"]["train"] == 17

    return ["model.fused=false"], check


def long_sentences(tmp: Path, files: dict[str, Path]) -> tuple[list[str], Callable[[dict], None]]:
    lines = files["train.src"].read_text().splitlines()
    lines[1] = lines[3] = " ".join(["tree"] * 30)
    files["train.src"].write_text("".join(line + "\n" for line in lines))

    def check(report: dict, tmp: Path) -> None:
        assert report["encoder_truncated"] == {"train": 2, "valid": 0, "test": 0}  # [CLS] + 30 words + [SEP] > 16

    return ["bert.max_length=16"], check


def beyond_positions(tmp: Path, files: dict[str, Path]) -> tuple[list[str], Callable[[dict, Path], None]]:
    """The tiny encoder has 128 positions, its (MiniLM) tokenizer a max length of 512: a longer line is cut to 128."""
    for split in ("valid", "test"):
        lines = files[f"{split}.src"].read_text().splitlines()
        lines[2] = " ".join(["tree"] * 200)
        files[f"{split}.src"].write_text("".join(line + "\n" for line in lines))

    def check(report: dict, tmp: Path) -> None:
        assert report["encoder_truncated"] == {"train": 0, "valid": 1, "test": 1}

    return ["eval.test=true", "eval.beam=2"], check


def stale_temp_folders(tmp: Path, files: dict[str, Path]) -> tuple[list[str], Callable[[dict, Path], None]]:
    """Temp folders of a cache build killed earlier (its process is gone) are removed by the next build."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp / "cache" / f".tmp-custom-en-de-0123456789ab.{gone.pid}.0badc0de"
    stale.mkdir(parents=True)
    (stale / "train.src.ids.npy").write_bytes(b"half")

    def check(report: dict, tmp: Path) -> None:
        assert not stale.exists()

    return [], check


@pytest.mark.parametrize("name, setup, warning", [
    ("empty lines are dropped and counted", empty_lines, None),
    ("long sentences are truncated and counted", long_sentences,
     "2 source sentences were truncated to the encoder's max_length=16"),
    ("lines beyond the encoder's positions are truncated and counted", beyond_positions,
     "2 source sentences were truncated to the encoder's max_length=128"),
    ("temp folders of killed cache builds are removed", stale_temp_folders, None),
])
def test_tolerated_input_is_counted(name: str, setup: Callable, warning: str | None, tmp_path: Path, bert: str) -> None:
    files = write_corpus(tmp_path)
    extra, check = setup(tmp_path, files)
    out = run_train(overridden(base_args(tmp_path, files, bert, plain=False), extra), BERTNMT_MIRROR="")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "run" / "meta.json").read_text())["data_report"]
    check(report, tmp_path)
    warnings = [line for line in out.stdout.splitlines() if "[WARNING]" in line]
    assert [w.split(" - ", 1)[1] for w in warnings] == ([f"{warning} ({report['encoder_truncated']})"] if warning else [])
