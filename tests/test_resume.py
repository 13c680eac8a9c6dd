"""Kill -9 or SIGTERM a training run, rerun the same command: it continues in the same run folder, and the final
weights equal, bit for bit, those of a run that was never interrupted (subprocesses through scripts/train.py).
Also: the two-stage recipe never retrains a finished stage, the run folder is found again, batches are skipped."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bertnmt.core.config import Config, TrainerConfig
from bertnmt.data.batching import TokenBatchSampler
from bertnmt.core.errors import ConfigError
from bertnmt.train.rundir import LOCK, find_unfinished, open_run_dir, release, save_config
from tiny_encoder import make_tiny_bert
from train_cli import popen_train, run_train

WORDS = "the a cat dog man woman sees likes runs to house red big small green tree car bird eats water".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny parallel corpus (target = reversed, mirrored words) and a tiny random BERT."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for split, n in [("train", 160), ("valid", 16), ("test", 8)]:
        src = [[rng.choice(WORDS) for _ in range(rng.randint(3, 12))] for _ in range(n)]
        (root / f"{split}.en").write_text("".join(" ".join(s) + "\n" for s in src))
        (root / f"{split}.de").write_text("".join(" ".join(w[::-1] for w in reversed(s)) + "\n" for s in src))
    make_tiny_bert(root / "bert")
    return root


def args(corpus: Path, runs: Path, cache: Path, *extra: str) -> list[str]:
    """The command: 7 updates per epoch, a step checkpoint every 3, the encoder unfreezes at step 7."""
    files = [f"data.custom.{s}.{side}={corpus}/{s}.{lang}" for s in ("train", "valid", "test")
             for side, lang in (("src", "en"), ("tgt", "de"))]
    return ["model=tiny", f"bert.path={corpus}/bert", "bert.name=tiny-bert", "data=custom", *files,
            f"data.cache_dir={cache}", "data.vocab_size=60", "data.max_tokens=300", "trainer.max_epochs=4",
            "trainer.save_every_steps=3", "trainer.keep_last=2", "trainer.progress=false", "trainer.tensorboard=false",
            "trainer.valid_bleu=false", "trainer.device=cpu", "optim.warmup_steps=5", "eval.test=false",
            "freeze=unfreeze_after", "freeze.unit=step", "freeze.unfreeze_at=7",
            "hydra.run.dir=" + str(runs) + "/${now:%Y-%m-%d_%H-%M-%S-%f}", *extra]


def only_run(runs: Path) -> Path:
    folders = [p for p in runs.iterdir()]
    assert len(folders) == 1, folders
    return folders[0]


def final(run: Path, stage: str, name: str = "checkpoint_last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / stage / name, weights_only=True)["model"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def epochs(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "results.jsonl").read_text().splitlines()) if "epoch" in r]


def wait_for(pattern: str, runs: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> Path:
    """Wait until a file matching ``pattern`` (under the run folders) exists; the child must still be running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(runs.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended before {pattern} appeared:\n{log.read_text()}"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"{pattern} did not appear:\n{log.read_text()}")


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command, never interrupted."""
    runs = tmp_path_factory.mktemp("straight")
    out = run_train(args(corpus, runs, corpus / "cache"))
    assert out.returncode == 0, out.stderr
    return only_run(runs)


@pytest.mark.slow
def test_kill9_mid_epoch_then_the_same_command_resumes_bit_exactly(corpus: Path, straight: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cmd = args(corpus, runs, corpus / "cache")
    proc = popen_train(cmd, tmp_path / "first.log")
    wait_for("*/checkpoints/fused/checkpoint_2_9.pt", runs, proc, tmp_path / "first.log")  # mid-epoch 2 (steps 8-14)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(600) == -signal.SIGKILL
    first = only_run(runs)
    assert not (first / "summary.json").exists()

    out = run_train(cmd)  # the same command: Hydra makes a new folder, the run continues in the first one
    assert out.returncode == 0, out.stderr
    assert only_run(runs) == first  # the new, empty folder is gone
    assert f"resuming the unfinished run in {first}" in out.stdout
    assert "[fused] resumed from" in out.stdout and "epoch 1 |" not in out.stdout
    assert (first / "summary.json").is_file() and not (first / LOCK).exists()
    assert_same(final(first, "fused"), final(straight, "fused"))
    ours, theirs = epochs(first), epochs(straight)
    assert [r["epoch"] for r in ours] == [1, 2, 3, 4]  # each epoch once
    for key in ("train_loss", "valid_loss", "step", "train_tokens", "trainable_params"):
        assert [r[key] for r in ours] == [r[key] for r in theirs], key
    names = sorted(p.name for p in (first / "checkpoints" / "fused").iterdir())
    assert names == ["checkpoint_4_24.pt", "checkpoint_4_27.pt", "checkpoint_best.pt", "checkpoint_last.pt"]
    assert "train.log" in os.listdir(first) and "resuming the unfinished run" in (first / "train.log").read_text()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cmd = args(corpus, runs, corpus / "cache")
    proc = popen_train(cmd, tmp_path / "first.log")
    wait_for("*/checkpoints/fused/checkpoint_1_3.pt", runs, proc, tmp_path / "first.log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(600) == 128 + signal.SIGTERM
    log = (tmp_path / "first.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in log, log
    step, path = errors[0].split("interrupted at step ")[1].split("; checkpoint saved to ")
    path = path.removesuffix("; rerun the same command to resume")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == int(step) >= 3 and Path(path).parent == only_run(runs) / "checkpoints" / "fused"
    # (the exact resume after SIGTERM is tested in-process in test_faults.py)


@pytest.mark.slow
def test_two_stage_recipe_continues_each_stage_and_never_retrains_a_finished_one(corpus: Path, tmp_path: Path) -> None:
    def two_stage(name: str) -> list[str]:
        # two stages: the main job's equal-budget third stage is left out (warm_start.compare=false)
        return args(corpus, tmp_path / name, tmp_path / f"cache-{name}", "+exp=frozen_bert", "trainer.max_epochs=2",
                    "warm_start.max_epochs=2", "freeze=frozen", "warm_start.compare=false")

    out = run_train(two_stage("straight"))
    assert out.returncode == 0, out.stderr
    straight = only_run(tmp_path / "straight")

    runs, cmd = tmp_path / "killed", two_stage("killed")
    proc = popen_train(cmd, tmp_path / "1.log")
    wait_for("*/checkpoints/baseline/checkpoint_1_3.pt", runs, proc, tmp_path / "1.log")  # in the baseline stage
    proc.send_signal(signal.SIGKILL)
    proc.wait(600)
    proc = popen_train(cmd, tmp_path / "2.log")
    wait_for("*/checkpoints/fused/checkpoint_1_3.pt", runs, proc, tmp_path / "2.log")  # in the fused stage
    proc.send_signal(signal.SIGKILL)
    proc.wait(600)
    second = (tmp_path / "2.log").read_text()
    assert "[baseline] resumed from" in second and "[baseline] epoch 1 step 0 |" not in second  # continued, not restarted
    run = only_run(runs)
    assert (run / "stage_baseline.json").is_file() and not (run / "stage_fused.json").exists()
    baseline_files = {p: p.stat().st_mtime_ns for p in (run / "checkpoints" / "baseline").iterdir()}

    out = run_train(cmd)
    assert out.returncode == 0, out.stderr
    assert only_run(runs) == run
    assert "reusing the cached baseline" in out.stdout and "[baseline]" not in out.stdout  # not trained again
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints" / "baseline").iterdir()} == baseline_files
    assert [(r["stage"], r["epoch"]) for r in epochs(run)] == [("baseline", 1), ("baseline", 2), ("fused", 1), ("fused", 2)]
    assert [r["train_loss"] for r in epochs(run)] == [r["train_loss"] for r in epochs(straight)]
    assert_same(final(run, "baseline", "checkpoint_best.pt"), final(straight, "baseline", "checkpoint_best.pt"))
    assert_same(final(run, "fused"), final(straight, "fused"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_dir"] == str(run) and summary["fused"]["epochs"] == summary["baseline"]["epochs"] == 2


# -- the run folder, in-process ----------------------------------------------------------------------
def config(out: Path, **trainer: object) -> Config:
    cfg = Config(trainer=TrainerConfig(**trainer))  # type: ignore[arg-type]
    cfg.output_dir = str(out)
    return cfg


def test_an_unfinished_run_of_the_same_config_is_found_and_continued(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old, finished, other, new = (runs / n for n in ("2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"))
    for folder, cfg in ((old, config(old)), (finished, config(finished)), (other, config(other, seed=2))):
        folder.mkdir(parents=True)
        save_config(cfg, folder)
    (finished / "summary.json").write_text("{}")
    (new / ".hydra").mkdir(parents=True)  # what Hydra puts into a fresh run folder
    (new / "train.log").write_text("[..][INFO] - started\n")
    cfg = config(new, resume="auto")  # trainer.resume itself may differ
    assert find_unfinished(new, cfg) == old
    assert find_unfinished(new, config(new, seed=3)) is None  # another config: a new run
    handler = logging.FileHandler(new / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        assert open_run_dir(cfg) == old and cfg.output_dir == str(old)
        logging.getLogger("bertnmt.test").warning("after the move")
        moved = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
                 and Path(h.baseFilename) == old / "train.log"]
        assert len(moved) == 1
        for h in moved:
            h.flush()
            logging.getLogger().removeHandler(h)
            h.close()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert not new.exists()
    assert (old / "train.log").read_text().splitlines()[0] == "[..][INFO] - started"
    assert "after the move" in (old / "train.log").read_text()
    assert json.loads((old / LOCK).read_text())["pid"] == os.getpid()
    release(old)
    assert not (old / LOCK).exists()


def test_a_run_held_by_a_live_process_is_not_resumed(tmp_path: Path) -> None:
    old, new = tmp_path / "a", tmp_path / "b"
    old.mkdir()
    save_config(config(old), old)
    code = f"import sys, time; from pathlib import Path; from bertnmt.train.rundir import acquire; acquire(Path({str(old)!r})); " \
           "print('locked', flush=True); time.sleep(30)"
    sleeper = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert sleeper.stdout.readline().strip() == "locked"
        assert find_unfinished(new, config(new)) is None
        with pytest.raises(ConfigError, match=f"output folder {old} is in use by process {sleeper.pid}"):
            open_run_dir(config(old, resume="never"))
    finally:
        sleeper.kill()  # like kill -9: the kernel drops its lock
        sleeper.wait()
    assert (old / LOCK).exists()  # a killed holder leaves its lock file, which locks nothing
    assert find_unfinished(new, config(new)) == old  # a dead holder: a killed run, free to resume


@pytest.mark.parametrize("state, resume, message", [
    ("finished", "auto", "already holds a finished run"),
    ("other", "auto", "already holds an unfinished run of another config"),
    ("same", "never", r"already holds a run \(trainer.resume=never\)"),
])
def test_a_folder_with_another_run_is_refused(tmp_path: Path, state: str, resume: str, message: str) -> None:
    save_config(config(tmp_path, seed=9 if state == "other" else 1), tmp_path)
    if state == "finished":
        (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"output folder {tmp_path} {message}; choose another hydra.run.dir"):
        open_run_dir(config(tmp_path, resume=resume))


def test_the_sampler_skips_the_first_batches_of_a_resumed_epoch() -> None:
    lens = np.random.default_rng(0).integers(2, 20, size=200).tolist()
    sampler = TokenBatchSampler(lens, lens, max_tokens=100, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5
    sampler.set_epoch(3)
    assert len(sampler) == len(sampler.batches()) and list(sampler) != full


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["same folder", "own folders"])
def test_two_commands_started_at_once_after_a_kill_lose_nothing(corpus: Path, tmp_path: Path, shared: bool) -> None:
    """After a kill -9, the same command started twice at once: one process resumes the killed run, the other
    starts its own run or is refused in one line; neither removes a folder or file the other one uses."""
    runs = tmp_path / "runs"
    base = [a for a in args(corpus, runs, corpus / "cache") if not a.startswith(("hydra.run.dir=", "trainer.max_epochs="))]
    base.append("trainer.max_epochs=2")
    old = runs / "old"
    proc = popen_train([*base, f"hydra.run.dir={old}"], tmp_path / "first.log")
    wait_for("old/checkpoints/fused/checkpoint_1_3.pt", runs, proc, tmp_path / "first.log")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(600) == -signal.SIGKILL

    folders = [runs / "new", runs / "new"] if shared else [runs / "new_a", runs / "new_b"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [popen_train([*base, f"hydra.run.dir={f}"], log) for f, log in zip(folders, logs)]
    codes = [p.wait(600) for p in procs]
    texts = [log.read_text() for log in logs]
    assert set(codes) <= {0, 2} and 0 in codes, texts
    resumed = [t for t in texts if f"resuming the unfinished run in {old}" in t]
    assert len(resumed) == 1, texts  # the killed run is continued by exactly one of them
    assert (old / "summary.json").is_file() and (old / "train.log").is_file() and (old / ".hydra").is_dir()
    for code, text in zip(codes, texts):
        assert "Traceback" not in text, text
        if code == 2:
            errors = [line for line in text.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "is in use by process" in errors[0], text
            continue
        run_dir = Path(re.search(r"run directory (\S+)", text)[1])
        assert (run_dir / "summary.json").is_file(), text
        assert (run_dir / "train.log").is_file() and (run_dir / ".hydra" / "config.yaml").is_file(), sorted(
            p.name for p in run_dir.iterdir())
        assert "[fused] epoch 2" in (run_dir / "train.log").read_text()
    assert not list(runs.rglob(LOCK))  # every lock released
