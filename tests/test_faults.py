"""Faults inside a training stage: non-finite losses, out of memory, SIGTERM at a step boundary, a corrupt last
checkpoint, a full disk, an unsafe checkpoint, trust_remote_code. In-process, on a tiny plain Transformer."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch

from bertnmt.train.checkpoint import LAST, load_checkpoint, save_checkpoint, step_checkpoints
from bertnmt.cli import exit_code
from bertnmt.core.config import BertConfig, Config, DataConfig, FreezeConfig, ModelConfig, OptimConfig, TrainerConfig
from bertnmt.data.prepare import PreparedData
from bertnmt.core.errors import CheckpointError, TrainingError, TrainingInterrupted
from bertnmt.train.freeze import FreezePolicy
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.train.trainer import Trainer
from fake_data import fake_data as shared_fake_data
from tiny_encoder import make_tiny_bert

PLAIN = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.1, fused=False)


def fake_data(n: int = 40) -> PreparedData:
    return shared_fake_data(n, max_len=9, with_encoder=False)


def make_trainer(run_dir: Path, epochs: int = 2, resume: Path | None = None, **trainer: object) -> Trainer:
    cfg = Config(model=PLAIN, freeze=FreezeConfig(policy="finetune"), optim=OptimConfig(lr=1e-3, warmup_steps=3),
                 data=DataConfig(max_tokens=60),
                 trainer=TrainerConfig(max_epochs=epochs, device="cpu", valid_bleu=False, tensorboard=False,
                                       progress=False, **trainer))  # type: ignore[arg-type]
    torch.manual_seed(7)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = BertFusedTransformer(PLAIN, 50, 0, None)
    return Trainer(cfg, model, fake_data(), FreezePolicy(cfg.freeze), run_dir, "baseline", {}, resume=resume)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def patch_forward(trainer: Trainer, fault: Callable[[int, Trainer], None]) -> list[dict[str, torch.Tensor]]:
    """Call ``fault(k, trainer)`` before the k-th training forward pass (1-based); returns the weights seen at each."""
    real = trainer._forward_loss
    seen: list[dict[str, torch.Tensor]] = []

    def forward(batch):
        if not trainer.model.training:  # validation
            return real(batch)
        seen.append(weights(trainer))
        loss, nll = real(batch)
        return fault(len(seen), trainer) or (loss, nll)

    trainer._forward_loss = forward  # type: ignore[method-assign]
    return seen


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    trainer = make_trainer(tmp_path_factory.mktemp("straight"))
    trainer.fit()
    return trainer


def test_nonfinite_loss_skips_the_update_and_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       straight: Trainer) -> None:
    caplog.set_level(logging.INFO)
    trainer = make_trainer(tmp_path)
    bad = {3: math.nan, 4: math.inf}
    loss = lambda k: (torch.tensor(bad[k], requires_grad=True), torch.tensor(0.0))  # noqa: E731
    seen = patch_forward(trainer, lambda k, t: loss(k) if k in bad else None)
    trainer.fit()
    assert_same(seen[2], seen[3])  # the update of the NaN batch did not happen...
    assert_same(seen[3], seen[4])  # ...nor that of the inf one after it
    assert not all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # while a good batch moves the weights
    n_batches = len(straight.train_loader.batch_sampler.batches())
    # skipped on the device (no host sync): the step count and schedule advance, AdamW's own count does not
    assert trainer.step == straight.step == 2 * n_batches
    assert trainer.scheduler.last_epoch == trainer.step
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {2 * n_batches - 2.0}
    recs = records(tmp_path)
    assert [(r["epoch"], r["skipped_nonfinite"], r["skipped_oom"]) for r in recs] == [(1, 2, 0), (2, 0, 0)]
    assert [m for m in caplog.messages if "skipped for a non-finite" in m] == [
        f"[baseline] epoch 1: 2 update(s) skipped for a non-finite loss or gradient norm by step {n_batches} "
        "(2 this epoch, 0 in a row now)"]
    assert any("skipped: 2 non-finite, 0 out of memory" in m for m in caplog.messages)


def test_nonfinite_losses_in_a_row_stop_with_the_step(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_nonfinite_in_row=3)
    patch_forward(trainer, lambda k, t: (torch.tensor(math.inf, requires_grad=True), torch.tensor(0.0)) if k > 2 else None)
    with pytest.raises(TrainingError, match=r"^3 non-finite losses in a row, the last at step 4 \(epoch 1, stage baseline\)"):
        trainer.fit()


def test_out_of_memory_skips_the_batch_and_is_counted(tmp_path: Path, straight: Trainer) -> None:
    trainer = make_trainer(tmp_path)

    def oom(k: int, t: Trainer) -> None:
        if k == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen = patch_forward(trainer, oom)
    trainer.fit()
    assert_same(seen[1], seen[2])
    assert trainer.step == straight.step - 1
    assert all(p.grad is None for p in trainer.model.parameters())
    assert [(r["skipped_nonfinite"], r["skipped_oom"]) for r in records(tmp_path)] == [(0, 1), (0, 0)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_next_step_boundary_and_resumes_exactly(tmp_path: Path, straight: Trainer,
                                                                       signum: int) -> None:
    before = signal.getsignal(signum)
    trainer = make_trainer(tmp_path)
    patch_forward(trainer, lambda k, t: os.kill(os.getpid(), signum) if k == 5 else None)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert signal.getsignal(signum) is before  # the handler is removed again
    err = info.value
    assert (err.signum, err.step) == (signum, 5)  # the update of batch 5 finished first
    assert str(err) == (f"interrupted at step 5; checkpoint saved to {tmp_path}/checkpoints/baseline/checkpoint_1_5.pt; "
                        "rerun the same command to resume")
    ckpt = load_checkpoint(err.path)
    assert (ckpt["step"], ckpt["position"]["batches_done"], ckpt["position"]["epoch_done"]) == (5, 5, False)
    assert not (tmp_path / "results.jsonl").exists()  # the epoch had not ended
    resumed = make_trainer(tmp_path, resume=tmp_path / "checkpoints" / "baseline")
    resumed.fit()
    assert_same(weights(resumed), weights(straight))
    ours, theirs = records(tmp_path), records(straight.run_dir)
    assert [r["train_loss"] for r in ours] == [r["train_loss"] for r in theirs]  # running sums restored
    assert [r["valid_loss"] for r in ours] == [r["valid_loss"] for r in theirs]


def test_exit_code_for_an_interruption_is_128_plus_the_signal(capsys: pytest.CaptureFixture) -> None:
    def interrupted() -> None:
        raise TrainingInterrupted(signal.SIGTERM, 12, "/x/checkpoint_1_12.pt")

    assert exit_code(interrupted) == 143
    err = capsys.readouterr().err
    assert err == ("error: interrupted at step 12; checkpoint saved to /x/checkpoint_1_12.pt; "
                   "rerun the same command to resume\n")


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path, straight: Trainer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    trainer = make_trainer(tmp_path, save_every_steps=2, keep_last=2)

    def crash(k: int, t: Trainer) -> None:
        if k == 6:
            raise RuntimeError("the machine went away")

    patch_forward(trainer, crash)
    with pytest.raises(RuntimeError):
        trainer.fit()
    folder = tmp_path / "checkpoints" / "baseline"
    assert [p.name for p in step_checkpoints(folder)] == ["checkpoint_1_2.pt", "checkpoint_1_4.pt"]  # keep_last=2
    last, newest = folder / LAST, folder / "checkpoint_1_4.pt"
    for bad in (last, newest):  # (hard links of each other: damage each on its own)
        data = bad.read_bytes()
        bad.unlink()
        bad.write_bytes(data[: len(data) // 2])
    (folder / "checkpoint_last.pt.123.tmp").write_bytes(b"half a save")
    with pytest.raises(CheckpointError, match=f"checkpoint {last} cannot be read: truncated or corrupt"):
        load_checkpoint(last)
    caplog.set_level(logging.INFO)
    resumed = make_trainer(tmp_path, resume=folder, save_every_steps=2, keep_last=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3
    assert warnings[0].startswith(f"checkpoint {last} cannot be read") and "falling back" in warnings[0]
    assert warnings[1].startswith(f"checkpoint {newest} cannot be read") and "skipping it" in warnings[1]
    assert warnings[2] == f"resuming from {folder / 'checkpoint_1_2.pt'} instead"
    assert resumed.step == 2 and resumed.start_epoch == 1
    assert not list(folder.glob("*.tmp"))
    resumed.fit()
    assert_same(weights(resumed), weights(straight))


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "ck" / "checkpoint_last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    real_save = torch.save

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")  # type: ignore[arg-type]  # torch.save gets the temp path
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    assert str(info.value) == (f"no space left on device while writing checkpoint {path}; the previous checkpoint is "
                               "intact: free some space and rerun the same command to resume")
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint_last.pt"]  # the temp file is gone
    # during training: the stage stops with that one line (exit code 2)
    trainer = make_trainer(tmp_path / "run", epochs=1, save_every_steps=3)
    assert exit_code(trainer.fit) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on device while writing checkpoint ") and err.count("\n") == 1
    assert "checkpoint_1_3.pt" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert not list((tmp_path / "run" / "checkpoints" / "baseline").iterdir())


class Payload:
    """Unpickling this would create a file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": {}, "extra": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt holds a pickled Python object \(\S+\), .*refusing to load it"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what plain unpickling would have done
    assert marker.exists()


def test_trust_remote_code_is_off_unless_set_and_logged_when_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bertnmt.recipe.pipeline import run

    bert = make_tiny_bert(tmp_path / "bert")
    caplog.set_level(logging.INFO)
    for trust in (False, True):
        cfg = Config(model=ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=1, dec_layers=1),
                     bert=BertConfig(path=bert, trust_remote_code=trust), freeze=FreezeConfig(dry_run=True),
                     data=DataConfig(vocab_size=50), trainer=TrainerConfig(max_epochs=1))
        cfg.output_dir = str(tmp_path / "run")
        caplog.clear()
        run(cfg)
        warned = [r for r in caplog.records if "trust_remote_code" in r.getMessage()]
        assert [r.levelname for r in warned] == (["WARNING"] if trust else [])
    assert BertConfig().trust_remote_code is False
    assert "bert.trust_remote_code=true: Python code shipped with the encoder" in warned[0].getMessage()


def test_a_step_checkpoint_newer_than_the_last_one_wins(tmp_path: Path, straight: Trainer) -> None:
    """A kill between writing checkpoint_1_4.pt and linking it as checkpoint_last.pt."""
    trainer = make_trainer(tmp_path, save_every_steps=2)
    patch_forward(trainer, lambda k, t: os.kill(os.getpid(), signal.SIGTERM) if k == 4 else None)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    folder = tmp_path / "checkpoints" / "baseline"
    (folder / LAST).unlink()
    os.link(folder / "checkpoint_1_2.pt", folder / LAST)  # the last one is still step 2's
    resumed = make_trainer(tmp_path, resume=folder)
    assert resumed.resumed_from == folder / "checkpoint_1_4.pt" and resumed.step == 4
    resumed.fit()
    assert_same(weights(resumed), weights(straight))


def test_exit_code_for_a_full_disk_outside_checkpoints(capsys: pytest.CaptureFixture) -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/results.jsonl")

    assert exit_code(full) == 2
    assert capsys.readouterr().err == ("error: no space left on device while writing runs/x/results.jsonl; "
                                       "free some space and rerun the same command to resume\n")


def test_a_damaged_cached_baseline_is_trained_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from bertnmt.recipe import pipeline
    from bertnmt.train.checkpoint import model_weights

    trained: list[Path] = []

    def train_stage(cfg: Config, data: object, run_dir: Path, stage: str, *args: object, **kw: object) -> dict:
        path = run_dir / f"baseline{len(trained)}.pt"
        model = BertFusedTransformer(ModelConfig(d_model=16, ffn_dim=32, heads=2, enc_layers=1, dec_layers=1,
                                                 fused=False), 30, 0, None)
        save_checkpoint(path, {"model": model_weights(model, include_bert=False), "stage": stage})
        trained.append(path)
        return {"checkpoint": str(path), "test_bleu": 1.0}

    monkeypatch.setattr(pipeline, "train_stage", train_stage)
    cfg = Config(data=DataConfig(cache_dir=str(tmp_path / "cache")))
    data = SimpleNamespace(key="k", vocab=SimpleNamespace(sha256="v" * 64))
    ckpt, summary = pipeline.ensure_baseline(cfg, data, tmp_path, {})
    assert len(trained) == 1 and ckpt.read_bytes() == trained[0].read_bytes()
    assert "reused_from" in pipeline.ensure_baseline(cfg, data, tmp_path, {})[1] and len(trained) == 1  # reused
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a kill or a full disk cut it short
    caplog.set_level(logging.WARNING, logger="bertnmt.recipe.pipeline")
    again, summary = pipeline.ensure_baseline(cfg, data, tmp_path, {})
    assert len(trained) == 2 and "reused_from" not in summary  # trained again, not loaded
    assert f"the cached baseline {ckpt.parent} is unreadable" in caplog.text and "training it again" in caplog.text
    assert load_checkpoint(again)["stage"] == "baseline"
