"""Every encoder family the conf/bert configs name, as a tiny random model with a real tokenizer of its
kind (tests/tiny_encoders.py): features, padding, layer choice, and a few training steps through the
full pipeline. KoBERT's hub layout (a BertModel with an XLNet-declared SentencePiece tokenizer) gets
BERT's [CLS] x [SEP] template, and translates Korean -> English as KoBERT users do."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from hydra import compose, initialize_config_dir

from bertnmt.core.config import BertConfig, register_configs
from bertnmt.data.tokenize import EncoderTokenizer
from bertnmt.core.errors import ConfigError
from bertnmt.inference.loading import load_model
from bertnmt.model.pretrained import PretrainedEncoder, check_tokenizer
from bertnmt.recipe.pipeline import run
from conftest import MIRROR_DIR
from tiny_encoders import FAMILIES, KOREAN_FAMILIES, make_encoder, tatoeba_columns, tiny_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    if not MIRROR_DIR.is_dir():
        pytest.skip(f"corpus mirror {MIRROR_DIR} is absent")
    return tatoeba_columns(MIRROR_DIR)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory, texts: tuple[list[str], list[str]]) -> dict[str, str]:
    english, korean = texts
    root = tmp_path_factory.mktemp("encoders")
    return {f: make_encoder(f, root / f, english, korean) for f in FAMILIES}


@pytest.mark.parametrize("name", ["minilm", "kobert", "bert_base_uncased", "bert_base_german_cased", "mbert",
                                  "xlm_roberta_base", "electra_base"])
def test_every_encoder_config_composes(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"bert={name}"])
    assert cfg.bert.name == name and cfg.bert.path and cfg.bert.layer == -1


def test_kobert_layout_gets_berts_template(encoders: dict[str, str], texts: tuple[list[str], list[str]]) -> None:
    import sentencepiece as spm

    tok = EncoderTokenizer(encoders["kobert"])
    assert type(tok.hf).__name__ == "SentencePieceBertTokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(Path(encoders["kobert"]) / "spiece.model"))
    korean = texts[1][:200]
    ids, n_cut = tok.encode_batch(korean)
    assert n_cut == 0 and tok.pad_id == 1
    for text, seq in zip(korean, ids):
        assert seq == [2, *sp.encode(text), 3]  # [CLS] x [SEP], the model's own SentencePiece ids
    unk = sum(i == 0 for seq in ids for i in seq)
    assert unk <= 0.01 * sum(map(len, ids))  # Hangul is not decomposed into unknown jamo
    # the template and the truncation count
    short = EncoderTokenizer(encoders["kobert"], max_length=4)
    cut, n_cut = short.encode_batch([korean[-1] + " " + korean[-2]])
    assert n_cut == 1 and cut[0][0] == 2 and cut[0][-1] == 3 and len(cut[0]) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_features_ignore_padding_and_pick_the_layer(family: str, encoders: dict[str, str],
                                                    texts: tuple[list[str], list[str]]) -> None:
    tok = EncoderTokenizer(encoders[family])
    check_tokenizer(BertConfig(path=encoders[family]), len(tok), tok.pad_id)
    sents = (texts[1] if family in KOREAN_FAMILIES else texts[0])[2000:2004]
    ids, _ = tok.encode_batch(sents)
    width = max(map(len, ids))
    enc_ids = torch.full((len(ids), width), tok.pad_id, dtype=torch.long)  # (B, E) right-padded
    enc_mask = torch.zeros(len(ids), width, dtype=torch.long)  # (B, E)
    for i, seq in enumerate(ids):
        enc_ids[i, : len(seq)] = torch.tensor(seq)
        enc_mask[i, : len(seq)] = 1
    for layer in (-1, 1):
        enc = PretrainedEncoder(BertConfig(path=encoders[family], layer=layer))
        enc.set_frozen(True)
        h = enc(enc_ids, enc_mask)  # (B, E, 32)
        assert h.shape == (len(ids), width, 32)
        for i, seq in enumerate(ids):  # a sentence alone gives the features it has inside a padded batch
            alone = enc(enc_ids[i : i + 1, : len(seq)], enc_mask[i : i + 1, : len(seq)])
            torch.testing.assert_close(h[i, : len(seq)], alone[0], atol=1e-5, rtol=1e-5)
    out = enc.model(input_ids=enc_ids, attention_mask=enc_mask, output_hidden_states=True)
    assert torch.equal(h, out.hidden_states[1])  # layer=1: the output of the first block
    assert not torch.equal(h, out.last_hidden_state)


def test_a_tokenizer_of_another_encoder_is_refused(encoders: dict[str, str]) -> None:
    tok = EncoderTokenizer(encoders["bert"])  # 30,522 WordPiece ids
    with pytest.raises(ConfigError, match="does not belong to this encoder"):
        check_tokenizer(BertConfig(path=encoders["xlmr"]), len(tok), tok.pad_id)  # 1,002 rows


def _read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_through_the_pipeline(family: str, encoders: dict[str, str], tmp_path: Path,
                                            mirror: Path) -> None:
    korean_src = family in KOREAN_FAMILIES
    data = "data=tatoeba_ko_en" if korean_src else "data=tatoeba_en_ko"
    layer = 1 if family in ("electra", "distilbert") else -1
    cfg = tiny_config(tmp_path, [data, f"bert.path={encoders[family]}", f"bert.name=tiny-{family}",
                                 f"bert.layer={layer}", "trainer.max_steps=6"], "run")
    summary = run(cfg)
    run_dir = Path(cfg.output_dir)
    records = [json.loads(line) for line in _read(run_dir / "results.jsonl")]
    epoch = next(r for r in records if r.get("stage") == "fused" and "epoch" in r)
    assert epoch["step"] == 6 and epoch["train_loss"] > 0
    bert = epoch["params_by_group"]["bert"]
    assert bert["trainable"] == 0 and epoch["total_params"] - epoch["trainable_params"] == bert["total"]
    assert epoch["params_by_group"]["fusion"]["trainable"] > 0

    test = next(r for r in records if r.get("split") == "test")
    hyps, refs = _read(run_dir / test["hypotheses"]), _read(run_dir / "test.ref")
    assert len(hyps) == len(refs) == 10
    tokenize = "13a" if korean_src else "ko-mecab"  # Korean output: sacreBLEU's MeCab tokenizer (sacrebleu[ko])
    direct = sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize)
    assert test["bleu"] == pytest.approx(round(direct.score, 2), abs=1e-9)
    assert f"|tok:{tokenize}" in test["bleu_signature"]

    # the exported folder restores the model without Hydra and reproduces the test hypotheses
    export = Path(summary["export"])
    assert export == run_dir / "export"
    info = json.loads((export / "export.json").read_text())
    assert info["encoder"]["path"] == encoders[family] and info["encoder"]["weights_included"] is False
    tr = load_model(export)
    sources = _read(next(Path(cfg.data.cache_dir).resolve().glob(f"tatoeba_en_ko-{cfg.data.src_lang}-*/test.src.txt")))
    assert tr.translate(sources, beam=2) == hyps
    hangul = lambda text: any("\uac00" <= c <= "\ud7a3" for c in text)  # noqa: E731
    if korean_src:  # Korean -> English, as KoBERT users translate (the joint vocabulary has both scripts)
        assert all(hangul(s) for s in sources) and not any(hangul(r) for r in refs)


@pytest.mark.parametrize("family", FAMILIES)
def test_max_length_never_exceeds_the_encoders_positions(family: str, encoders: dict[str, str]) -> None:
    from bertnmt.data.tokenize import encoder_positions

    positions = encoder_positions(encoders[family])
    # RoBERTa-style position ids start after the padding id: 130 rows hold 128 positions
    assert positions == {"roberta": 128, "xlmr": 128, "kobert": 512}.get(family, 130)
    tok = EncoderTokenizer(encoders[family], max_length=100_000)
    assert tok.max_length <= positions
    ids, cut = tok.encode_batch(["the house " * 300])
    assert cut == 1 and len(ids[0]) == tok.max_length
    encoder = PretrainedEncoder(BertConfig(path=encoders[family])).eval()
    out = encoder(torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.long))  # no index past the table
    assert out.shape == (1, len(ids[0]), 32)
