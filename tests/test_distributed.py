"""Data-parallel training: 2 CPU processes (gloo, under torchrun) against one process.

Two processes with half the batches each (rank r takes batches r, r+2, ...) make the same updates as one
process that accumulates both halves (``accum_steps=2``): the weights agree to 1e-6 (here exactly),
with a frozen encoder (bit-identical on both ranks) and across an unfreeze switch (a new DDP wrapper).
Drop-net 1.0, which skips a branch in every layer and forward, trains with the same draws on both ranks.
``scripts/train.py`` under torchrun writes one run folder, from rank 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bertnmt.train import distributed
from bertnmt.data.batching import TokenBatchSampler
from bertnmt.core.errors import ConfigError
from bertnmt.model import fusion
from ddp_worker import SCENARIOS, make_model, run_scenario
from tiny_encoder import make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def child_env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def ddp_runs(bert_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every scenario of tests/ddp_worker.py on 2 processes (one torchrun, about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "ddp_worker.py"), bert_path, str(out)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def ranks(out: Path, name: str) -> tuple[dict, dict]:
    r0, r1 = (torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in (0, 1))
    return r0, r1


# A key projection's bias adds the same amount to every score of a query, which softmax ignores: its gradient is
# zero in exact arithmetic, and what it gets is rounding noise that Adam scales up to full-size steps. Across
# another summation order (one process summing two micro-batches, or two ranks all-reducing) that noise differs,
# so these tensors are compared only between the two ranks of one run (exactly), not against one process.
NOISE_ONLY = ("self_attn.k_proj.bias", "cross_attn.k_proj.bias", "bert_attn.k_proj.bias")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        elif not k.endswith(NOISE_ONLY):
            torch.testing.assert_close(a[k], b[k], rtol=0.0, atol=atol, msg=k)


def pretrained(bert_path: str, name: str) -> dict[str, torch.Tensor]:
    overrides = SCENARIOS[name][0]
    from bertnmt.core.config import ModelConfig

    model = make_model(bert_path, ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, **overrides))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def check_equivalence(out: Path, bert_path: str, name: str, tmp_path: Path) -> tuple[dict, dict]:
    """Rank 0 == rank 1 exactly; both == one process with accum_steps=2 (the whole batch) to 1e-6."""
    r0, r1 = ranks(out, name)
    assert_same_weights(r0["weights"], r1["weights"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same kernels, the same rounding
    try:
        one = run_scenario(name, bert_path, tmp_path, accum=2)
    finally:
        torch.set_num_threads(threads)
    assert r0["step"] == one["step"] > 0
    assert_same_weights(r0["weights"], one["weights"], atol=1e-6)
    # the shards: disjoint halves of the epoch's batches, as many on each rank
    assert len(r0["batches"]) == len(r1["batches"]) and not set(map(tuple, r0["batches"])) & set(map(tuple, r1["batches"]))
    # rank 0's record is the whole epoch's: every target token of both ranks, the same mean loss
    for e0, e1 in zip(r0["epochs"], one["epochs"], strict=True):
        assert e0["train_tokens"] == e1["train_tokens"]
        assert e0["train_loss"] == pytest.approx(e1["train_loss"], rel=1e-6)
        assert e0["valid_loss"] == pytest.approx(e1["valid_loss"], rel=1e-6)
    return r0, r1


@pytest.mark.slow
def test_two_processes_with_half_the_batch_match_one_with_the_whole_batch(ddp_runs: Path, bert_path: str,
                                                                         tmp_path: Path) -> None:
    r0, r1 = check_equivalence(ddp_runs, bert_path, "frozen", tmp_path)
    assert r0["wraps"] == 1
    before = pretrained(bert_path, "frozen")
    for res in (r0, r1):  # the frozen encoder is bit-identical on both ranks; the NMT part trained
        assert all(torch.equal(res["weights"][k], v) for k, v in before.items() if k.startswith("bert."))
        assert not torch.equal(res["weights"]["encoder.layers.0.bert_attn.q_proj.weight"],
                               before["encoder.layers.0.bert_attn.q_proj.weight"])


@pytest.mark.slow
def test_unfreeze_switch_rewraps_and_trains_the_encoder_on_both_ranks(ddp_runs: Path, bert_path: str,
                                                                      tmp_path: Path) -> None:
    r0, r1 = check_equivalence(ddp_runs, bert_path, "switch", tmp_path)
    assert r0["wraps"] == r1["wraps"] == 2  # the first wrapper without the encoder, a second one at update 3
    before = pretrained(bert_path, "switch")
    key = "bert.model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(r0["weights"][key], before[key]) and torch.equal(r0["weights"][key], r1["weights"][key])


@pytest.mark.slow
def test_drop_net_skipping_branches_trains_with_the_same_draws_on_both_ranks(ddp_runs: Path, bert_path: str) -> None:
    r0, r1 = ranks(ddp_runs, "dropnet")
    assert r0["draws"] == r1["draws"] and set(r0["draws"]) == {(1.0, 0.0), (0.0, 1.0)}  # p_net=1: always one branch
    assert_same_weights(r0["weights"], r1["weights"])  # the averaged gradients kept the ranks identical
    assert r0["wraps"] == 2 and r0["step"] == 6
    # the hard case happened: a BERT branch used in an update's first micro-batch (gradients kept locally,
    # no all-reduce) and skipped in its second one (the all-reduce): its gradient was still averaged
    layers = 4  # 2 encoder + 2 decoder layers draw once per forward each
    per_forward = [r0["draws"][i:i + layers] for i in range(0, len(r0["draws"]), layers)]
    assert any(a[1] > 0 and b[1] == 0 for first, second in zip(per_forward[::2], per_forward[1::2])
               for a, b in zip(first, second))
    before = pretrained(bert_path, "dropnet")
    key = "bert.model.encoder.layer.1.output.dense.weight"
    assert not torch.equal(r0["weights"][key], before[key])


def test_sampler_shards_batches_and_drops_the_remainder() -> None:
    lens = [3, 5, 7, 4, 6, 8, 2, 9, 5, 5, 6, 7, 3]
    full = TokenBatchSampler(lens, lens, max_tokens=16, seed=3)
    full.set_epoch(2)
    everything = full.batches()
    assert len(everything) % 3 != 0  # so that something is dropped
    shards = []
    for r in range(3):
        s = TokenBatchSampler(lens, lens, max_tokens=16, seed=3)
        s.set_shard(r, 3)
        s.set_epoch(2)
        shards.append(s.batches())
        assert s.all_batches() == everything
    usable = len(everything) - len(everything) % 3
    assert [len(s) for s in shards] == [usable // 3] * 3
    assert [b for i in range(usable // 3) for b in (shards[0][i], shards[1][i], shards[2][i])] == everything[:usable]
    few = TokenBatchSampler([3, 3], [3, 3], max_tokens=100)
    few.set_shard(1, 2)
    with pytest.raises(ConfigError, match="makes 1 batches of data.max_tokens=100 for 2 processes"):
        few.batches()


def test_one_process_helpers_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.setup("cpu") and not distributed.active() and distributed.is_main()
    assert distributed.loss_denominator(123, torch.device("cpu")) == 123  # the old `loss / ntok`, an int
    loss = torch.tensor(5.0)
    assert distributed.sum_over_ranks(loss, 7) == (loss, 7)
    with distributed.main_first():
        pass
    argv = ["train.py", "model=tiny"]
    assert distributed.hydra_argv(argv) == argv
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.hydra_argv(argv) == [*argv, "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def test_drop_net_generator_ignores_other_random_draws() -> None:
    def draws(extra: int) -> list[tuple[float, float]]:
        fusion.seed_drop_net(7)
        out = []
        for _ in range(20):
            torch.rand(extra)  # e.g. dropout masks of a rank's own batch shape
            out.append(fusion.drop_net_weights(1.0, True))
        return out

    try:
        assert draws(3) == draws(1000)
        assert set(draws(3)) == {(1.0, 0.0), (0.0, 1.0)}
    finally:
        fusion.seed_drop_net(None)
    assert fusion.drop_net_generator() is None


@pytest.mark.slow
def test_torchrun_train_py_writes_one_run_from_rank_0(tmp_path: Path, bert_path: str, mirror: Path) -> None:
    cmd = [*TORCHRUN, str(ROOT / "scripts" / "train.py"), "+exp=frozen_bert", "model=tiny", f"bert.path={bert_path}",
           "bert.name=tiny-bert", f"data.cache_dir={tmp_path / 'cache'}", "data.train_limit=60", "data.valid_limit=12",
           "data.test_limit=12", "data.vocab_size=300", "data.max_tokens=200", "trainer.max_epochs=2",
           "trainer.progress=false", "trainer.tensorboard=true", "trainer.device=cpu", "optim.warmup_steps=10",
           "optim.lr=1e-3", "eval.beam=2", "warm_start.max_epochs=1", "warm_start.compare=false"]
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(cmd, cwd=work, env={**child_env(), "BERTNMT_MIRROR": str(mirror)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("total time") == 1  # the summary, printed by rank 0
    assert sorted(os.listdir(work)) == ["runs"]  # rank 1 made no folder of its own (no outputs/, no .hydra/)
    (run_dir,) = (work / "runs" / "frozen_bert").iterdir()
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [(r["stage"], r.get("epoch"), r.get("split")) for r in records] == [
        ("baseline", 1, None), ("baseline", None, "test"), ("fused", 1, None), ("fused", 2, None), ("fused", None, "test")]
    fused = [r for r in records if r["stage"] == "fused" and "epoch" in r]
    assert all(r["train_tokens"] > 0 and r["tokens_per_s"] > 0 for r in fused)
    for stage in ("baseline", "fused"):  # one TensorBoard writer (rank 0's), the checkpoints rank 0 wrote
        assert len(list((run_dir / "tb" / stage).glob("events.out.tfevents.*"))) == 1
        assert (run_dir / "checkpoints" / stage / "checkpoint_best.pt").is_file()
    assert not list(run_dir.rglob("*.tmp"))
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "summary.json").is_file()
    assert (run_dir / ".hydra").is_dir() and "distributed: 2 processes, backend gloo" in (run_dir / "train.log").read_text()
    assert len(list((tmp_path / "cache" / "baselines").iterdir())) == 1


def test_bench_ddp_plans_the_same_batches_for_every_run(capsys: pytest.CaptureFixture) -> None:
    from bertnmt.experiments import bench_ddp

    with pytest.raises(SystemExit):
        bench_ddp.main(["--steps", "63", "--nproc", "2"])
    assert "--steps=63 must be a multiple of --nproc=2" in capsys.readouterr().err
    rows = [{"run": "1 proc x 2 threads", "updates": 64, "train_tokens": 1000, "epoch_time_s": 2.0, "tokens_per_s": 500.0,
             "train_loss": 8.0, "command_s": 9.0},
            {"run": "2 procs x 1 thread", "updates": 32, "train_tokens": 1000, "epoch_time_s": 1.0, "tokens_per_s": 1000.0,
             "train_loss": 8.5, "command_s": 8.0}]
    table = bench_ddp.markdown(rows).splitlines()
    assert table[-1] == "| 2 procs x 1 thread | 32 | 1,000 | 1.0 | 1,000 | 2.00 | 8.5000 | 8.0 |"
    assert bench_ddp.train_cmd(2)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
