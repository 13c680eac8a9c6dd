"""The decode loop: min_len, the finished check every k steps, length-sorted token-budget batches in input
order, and valid BLEU every N epochs on a recorded subset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bertnmt.core.config import Config, DataConfig, EvalConfig, FreezeConfig, ModelConfig, OptimConfig, TrainerConfig
from bertnmt.decoding.loop import DecodeOptions, decode_corpus, length_batches
from bertnmt.core.errors import ConfigError
from bertnmt.train.freeze import FreezePolicy
from bertnmt.model.nmt import BertFusedTransformer
from bertnmt.decoding.search import beam_search, greedy_search, max_lengths
from bertnmt.train.trainer import Trainer
from fake_data import fake_data
from test_search import BOS, EOS, PAD, UNK, batch, bert, make_model, pad_seqs, random_sents  # noqa: F401 (bert: fixture)

CPU = torch.device("cpu")


def favour_eos(model: BertFusedTransformer, bonus: float = 50.0, per_step: float = 0.0) -> BertFusedTransformer:
    """Add ``bonus + per_step * t`` to the eos logit at decoding step t (a large bonus: eos is by far the
    likeliest token; a small growing one: sentences end at different steps)."""
    real = model.decode

    def decode(tgt_in, enc, state=None, keep=None):
        logits = real(tgt_in, enc, state, keep)
        logits[..., EOS] += bonus + per_step * (state.step if state is not None else 0)
        return logits

    model.decode = decode  # type: ignore[method-assign]
    return model


def test_min_len_one_never_returns_an_empty_hypothesis():
    model = favour_eos(make_model(None, seed=3)).eval()
    sents = random_sents(5, 2, 8, seed=11)
    src, enc_ids, enc_mask = batch(sents)[0], None, None
    # without min_len the construction does what it should: eos first, empty translations
    assert greedy_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1, min_len=0)) == [[]] * 5
    assert all(h[0][0] == [] for h in beam_search(model, src, enc_ids, enc_mask, DecodeOptions(min_len=0)))
    # the default: at least one token, and eos right after it (it is still by far the likeliest)
    assert DecodeOptions().min_len == EvalConfig().min_len == 1
    assert [len(h) for h in greedy_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1))] == [1] * 5
    for nbest in beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=4, nbest=4)):
        assert len(nbest) == 4 and all(len(toks) == 1 for toks, _ in nbest)
    for nbest in beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=4, nbest=4, min_len=3)):
        assert all(len(toks) == 3 for toks, _ in nbest)
    # the max length wins over min_len: eos forced after 2 tokens, with a finite score
    for nbest in beam_search(model, src, enc_ids, enc_mask, DecodeOptions(max_len_a=0.0, max_len_b=2, min_len=5)):
        assert len(nbest[0][0]) == 2 and np.isfinite(nbest[0][1])


def test_max_length_rule():
    src = pad_seqs([[5, 6, 7, EOS], [5, EOS], [EOS]])  # 4, 2 and 1 source tokens incl. eos
    assert max_lengths(src, DecodeOptions(max_len_a=1.5, max_len_b=10)).tolist() == [16, 13, 11]
    assert max_lengths(src, DecodeOptions(max_len_a=0.5, max_len_b=0)).tolist() == [2, 1, 0]


@pytest.mark.parametrize("beam", [1, 4])
def test_check_every_k_steps_equals_checking_every_step(beam):
    model = favour_eos(make_model(None, seed=5), bonus=0.0, per_step=0.5).eval()  # sentences end at different steps
    sents = random_sents(9, 1, 9, seed=12)
    src, enc_ids, enc_mask = batch(sents)[0], None, None
    ref = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=beam, nbest=beam, max_len_b=6, check_every=1))
    limits = max_lengths(src, DecodeOptions(max_len_b=6)).tolist()
    assert any(len(nb[0][0]) < n for nb, n in zip(ref, limits))  # some sentences end before their max length
    for k in (3, 8, 100):
        got = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=beam, nbest=beam, max_len_b=6, check_every=k))
        for a, b in zip(ref, got):
            assert [t for t, _ in a] == [t for t, _ in b]
            assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
        greedy = greedy_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1, max_len_b=6, check_every=k))
        assert greedy == [h[0][0] for h in beam_search(model, src, enc_ids, enc_mask,
                                                         DecodeOptions(beam=1, max_len_b=6, check_every=1))]


def test_greedy_equals_full_non_incremental_argmax():
    """Greedy search (incremental, checked every 8 steps) against re-running the whole prefix at every step."""
    model = make_model(None, seed=8).eval()
    sents = random_sents(6, 1, 8, seed=13)
    src = pad_seqs([s + [EOS] for s in sents])
    opts = DecodeOptions(beam=1, max_len_b=5, check_every=8)
    got = greedy_search(model, src, opts=opts)
    limits = max_lengths(src, opts).tolist()
    with torch.no_grad():
        enc = model.encode(src)
        for i, n in enumerate(limits):
            enc_i = type(enc)(enc.enc_out[i : i + 1], enc.src_pad[i : i + 1])
            prefix = [BOS]
            while len(prefix) - 1 < n:
                logits = model.decode(torch.tensor([prefix]), enc_i)[0, -1]  # (V,)
                logits[[PAD, BOS, UNK]] = float("-inf")
                if len(prefix) == 1:
                    logits[EOS] = float("-inf")  # min_len 1
                tok = int(logits.argmax())
                if tok == EOS:
                    break
                prefix.append(tok)
            assert got[i] == prefix[1:], i


def test_length_batches_cover_every_sentence_within_the_budget():
    rng = np.random.default_rng(0)
    src = rng.integers(1, 30, size=50).tolist()
    enc = [n + int(rng.integers(0, 6)) for n in src]
    batches = length_batches(src, enc, beam=4, max_tokens=400)
    assert sorted(i for b in batches for i in b) == list(range(50))
    widths = [max(max(src[i] + 1, enc[i]) for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    assert all(4 * len(b) * w <= 400 or len(b) == 1 for b, w in zip(batches, widths))
    assert len(batches) > 5
    assert [len(b) for b in length_batches(src, None, beam=1, max_tokens=10**6, max_sents=7)] == [7] * 7 + [1]


def test_decode_corpus_restores_input_order_and_batches_alike(bert):
    model = make_model(bert, seed=6).eval()
    sents = random_sents(8, 1, 8, seed=14)
    src_ids = [np.asarray(s, dtype=np.int32) for s in sents]
    enc_ids = [np.asarray([101] + [1000 + t for t in s] + [102], dtype=np.int32) for s in sents]
    opts = DecodeOptions(beam=3, nbest=3, max_len_b=4)
    direct = beam_search(model, *batch(sents), opts)  # one batch, input order
    for kw in (dict(max_tokens=10**6), dict(max_tokens=3 * 12 * 2), dict(max_sents=1)):
        o = DecodeOptions(**{**opts.__dict__, **kw})
        n_batches = len(length_batches([len(s) for s in src_ids], [len(e) for e in enc_ids], 3, o.max_tokens or 10**6,
                                       o.max_sents))
        assert (n_batches == 1) == ("max_tokens" in kw and kw["max_tokens"] == 10**6)
        got = decode_corpus(model, src_ids, enc_ids, o, CPU, enc_pad_id=0)
        for a, b in zip(direct, got):
            assert [t for t, _ in a] == [t for t, _ in b]
            assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)
    greedy = decode_corpus(model, src_ids, enc_ids, DecodeOptions(beam=1, max_len_b=4, max_tokens=40), CPU, 0)
    assert [h[0][0] for h in greedy] == greedy_search(model, *batch(sents), DecodeOptions(beam=1, max_len_b=4))
    assert all(h[0][1] is None for h in greedy)


@pytest.mark.parametrize("bad", [dict(beam=0), dict(beam=2, nbest=3), dict(check_every=-1), dict(min_len=-1)])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        DecodeOptions(**bad)


class _Vocab:
    pad_id = 0
    sha256 = "fake"

    def __len__(self) -> int:
        return 50

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def test_valid_bleu_every_n_epochs_on_a_recorded_subset(tmp_path: Path):
    data = fake_data(20, max_len=7, with_encoder=False)
    data.vocab = _Vocab()  # type: ignore[assignment]
    valid = data.splits["valid"]
    valid.tgt_text = [" ".join(map(str, t)) for t in valid.tgt_ids]
    model_cfg = ModelConfig(d_model=32, ffn_dim=64, heads=2, enc_layers=1, dec_layers=1, fused=False)
    cfg = Config(model=model_cfg, freeze=FreezeConfig(policy="finetune"), optim=OptimConfig(lr=1e-3, warmup_steps=3),
                 data=DataConfig(max_tokens=80), eval=EvalConfig(max_len_b=3),
                 trainer=TrainerConfig(max_epochs=4, device="cpu", valid_bleu=True, valid_bleu_every=3,
                                       valid_max_sents=7, tensorboard=False, progress=False))
    torch.manual_seed(0)
    model = BertFusedTransformer(model_cfg, 50, 0, None)
    trainer = Trainer(cfg, model, data, FreezePolicy(cfg.freeze), tmp_path, "baseline", {})
    result = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [("valid_bleu" in r) for r in rows] == [False, False, True, True]  # every 3rd, and the last
    assert all(r["valid_bleu_sents"] == 7 for r in rows if "valid_bleu" in r)
    assert all("valid_loss" in r for r in rows)
    best = torch.load(result.best_path, weights_only=False)
    assert best["epoch"] in (3, 4) and best["metric"] == max(r["valid_bleu"] for r in rows if "valid_bleu" in r)
    with pytest.raises(ConfigError):
        Trainer(Config(model=model_cfg, trainer=TrainerConfig(valid_bleu_every=0, device="cpu")), model, data,
                FreezePolicy(FreezeConfig(policy="finetune")), tmp_path / "bad", "baseline", {})
