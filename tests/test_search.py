"""Greedy / beam search: incremental = full pass, beam 1 = greedy, batching, an overfit copy task."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from bertnmt.core.config import BertConfig, ModelConfig
from bertnmt.model import BertFusedTransformer, PretrainedEncoder
from bertnmt.model.nmt import EncoderOut
from bertnmt.decoding.search import DecodeOptions, _topk_rows, beam_search, greedy_search

try:
    from tests.tiny_encoder import make_tiny_bert
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from tiny_encoder import make_tiny_bert

V, PAD, UNK, BOS, EOS = 24, 0, 1, 2, 3


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> PretrainedEncoder:
    enc = PretrainedEncoder(BertConfig(path=make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))))
    enc.set_frozen(True)
    return enc


def make_model(bert: PretrainedEncoder | None, seed: int = 0, **kw) -> BertFusedTransformer:
    torch.manual_seed(seed)
    random.seed(seed)  # drop-net draws come from Python's RNG: the same branches whatever ran before
    base = dict(d_model=32, ffn_dim=64, heads=2, enc_layers=2, dec_layers=2, dropout=0.0,
                fused=bert is not None)
    base.update(kw)
    return BertFusedTransformer(ModelConfig(**base), V, PAD, bert)


def pad_seqs(seqs: list[list[int]], value: int = PAD) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def encoder_view(sents: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake WordPiece ids for the tiny BERT: [CLS] ids+1000 [SEP], right-padded with 0."""
    ids = pad_seqs([[101] + [1000 + t for t in s] + [102] for s in sents])
    return ids, ids.ne(0).long()


def random_sents(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, V, (k,), generator=g).tolist() for k in lens]


def batch(sents: list[list[int]]):
    src = pad_seqs([s + [EOS] for s in sents])
    enc_ids, enc_mask = encoder_view(sents)
    return src, enc_ids, enc_mask


@pytest.mark.parametrize("pre_ln", [False, True])
def test_incremental_matches_full_pass(bert, pre_ln):
    model = make_model(bert, pre_ln=pre_ln).eval()
    src, enc_ids, enc_mask = batch(random_sents(4, 3, 9, seed=1))
    tgt_in = pad_seqs([[BOS] + s for s in random_sents(4, 2, 8, seed=2)])
    with torch.no_grad():
        enc = model.encode(src, enc_ids, enc_mask)
        full = F.log_softmax(model.decode(tgt_in, enc), dim=-1)  # (B, T, V)
        state = model.init_decoder_state(enc)
        steps = [F.log_softmax(model.decode(tgt_in[:, t : t + 1], None, state), dim=-1)
                 for t in range(tgt_in.size(1))]
    inc = torch.cat(steps, dim=1)
    real = tgt_in.ne(PAD)
    assert state.step == tgt_in.size(1)
    assert torch.allclose(inc[real], full[real], atol=1e-5)


def test_beams_share_static_keys(bert):
    """expand(K) shares each sentence's cross/BERT keys among its beams: same logits as copies."""
    model = make_model(bert).eval()
    src, enc_ids, enc_mask = batch(random_sents(3, 3, 9, seed=3))
    steps = torch.randint(4, V, (3 * 4, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc = model.encode(src, enc_ids, enc_mask)
        shared = model.init_decoder_state(enc).expand(4)
        rep = lambda t: t.repeat_interleave(4, dim=0)  # noqa: E731
        copied = model.init_decoder_state(
            EncoderOut(rep(enc.enc_out), rep(enc.src_pad), rep(enc.bert_out), rep(enc.bert_pad))
        )
        assert shared.batch_size == copied.batch_size == 12 and shared.cross_kv[0][0].size(0) == 3
        perm = torch.tensor([1, 0, 3, 2, 4, 7, 6, 5, 10, 11, 9, 8])  # beams move within sentences
        for t in range(3):
            a = model.decode(steps[:, t : t + 1], None, shared)
            b = model.decode(steps[:, t : t + 1], None, copied)
            assert torch.allclose(a, b, atol=1e-5)
            shared.select(perm), copied.select(perm)
            steps = steps[perm]
        keep = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])  # drop sentence 1, swap the others
        shared.select(keep), copied.select(keep)
        a = model.decode(steps[keep, 2:3], None, shared)
        assert torch.allclose(a, model.decode(steps[keep, 2:3], None, copied), atol=1e-5)
        with pytest.raises(ValueError):
            shared.select(torch.tensor([0, 1, 2, 4, 5, 6, 7, 3]))  # mixes two sentences' beams


def test_topk_rows_matches_torch():
    g = torch.Generator().manual_seed(0)
    for n_vocab in (50, 8000, 8003):
        x = torch.randn(7, n_vocab, generator=g)
        x[:, :3] = float("-inf")
        values, idx = _topk_rows(x, 10)
        assert torch.equal(values, x.topk(10, dim=1).values)
        assert torch.equal(x.gather(1, idx), values)


@pytest.fixture(scope="module")
def copy_model(bert) -> tuple[BertFusedTransformer, list[list[int]]]:
    """A tiny fused model overfit on a copy task of 6 sentences."""
    sents = random_sents(6, 3, 8, seed=5)
    model = make_model(bert, seed=0, drop_net=0.0)  # both branches always: training independent of drop-net draws
    src, enc_ids, enc_mask = batch(sents)
    tgt_in = pad_seqs([[BOS] + s for s in sents])
    tgt_out = pad_seqs([s + [EOS] for s in sents])
    bert_out = model.bert_features(enc_ids, enc_mask)  # frozen: computed once
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        logits = model(src, tgt_in, bert_out=bert_out)
        F.cross_entropy(logits.view(-1, V), tgt_out.view(-1), ignore_index=PAD).backward()
        opt.step()
    return model.eval(), sents


def test_overfit_copy_task_is_reproduced(copy_model):
    model, sents = copy_model
    src, enc_ids, enc_mask = batch(sents)
    hyps = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=5))
    assert [h[0][0] for h in hyps] == sents
    assert greedy_search(model, src, enc_ids, enc_mask) == sents


@pytest.mark.parametrize("trained", [False, True])
def test_beam1_equals_greedy(bert, copy_model, trained):
    model = copy_model[0] if trained else make_model(bert, seed=3)
    src, enc_ids, enc_mask = batch(random_sents(7, 2, 9, seed=7))
    greedy = greedy_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1, max_len_a=1.0, max_len_b=5))
    beam = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=1, max_len_a=1.0, max_len_b=5))
    assert [h[0][0] for h in beam] == greedy


@pytest.mark.parametrize("trained", [False, True])
def test_beam5_nbest_sorted_clean_and_bounded(bert, copy_model, trained):
    model = copy_model[0] if trained else make_model(bert, seed=3)
    sents = random_sents(6, 2, 9, seed=8)
    src, enc_ids, enc_mask = batch(sents)
    hyps = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=5, nbest=3, max_len_a=1.5, max_len_b=3))
    assert len(hyps) == len(sents)
    for s, nb in zip(sents, hyps):
        assert len(nb) == 3
        scores = [score for _, score in nb]
        assert scores == sorted(scores, reverse=True)
        for toks, score in nb:
            assert not {PAD, UNK, BOS, EOS} & set(toks)
            assert len(toks) <= int(1.5 * (len(s) + 1) + 3)
            assert score <= 0.0


@pytest.mark.parametrize("trained", [False, True])
def test_batch_equals_one_by_one(bert, copy_model, trained):
    """Sentences that finish early leave the batch without changing the others' results."""
    model = copy_model[0] if trained else make_model(bert, seed=4)
    sents = random_sents(5, 1, 9, seed=9) if not trained else copy_model[1][:5]
    src, enc_ids, enc_mask = batch(sents)
    together = beam_search(model, src, enc_ids, enc_mask, DecodeOptions(beam=5, nbest=5, max_len_b=4))
    for i, s in enumerate(sents):
        alone = beam_search(model, *batch([s]), DecodeOptions(beam=5, nbest=5, max_len_b=4))[0]
        assert [t for t, _ in alone] == [t for t, _ in together[i]]
        assert [sc for _, sc in alone] == pytest.approx([sc for _, sc in together[i]], abs=1e-4)


def test_plain_model_search_and_lenpen():
    model = make_model(None, seed=6).train()
    src = pad_seqs([s + [EOS] for s in random_sents(3, 2, 6, seed=10)])
    greedy = greedy_search(model, src, opts=DecodeOptions(beam=1, max_len_b=4))
    assert [h[0][0] for h in beam_search(model, src, opts=DecodeOptions(beam=1, max_len_b=4))] == greedy
    for lenpen in (0.0, 2.0):
        for nb in beam_search(model, src, opts=DecodeOptions(beam=4, nbest=4, lenpen=lenpen, max_len_b=4)):
            scores = [score for _, score in nb]
            assert scores == sorted(scores, reverse=True)
    assert model.training  # search runs in eval mode and restores the mode afterwards
