"""BLEU options: Korean through sacreBLEU's MeCab tokenizer (sacrebleu[ko]), its fallback, paper style."""
from __future__ import annotations

import logging

import pytest
import sacrebleu

from bertnmt.decoding import metrics
from bertnmt.decoding.metrics import BleuOptions, bleu_tokenizer_for, corpus_scores, paper_options

HYP = ["나는 어제 학교에 갔다.", "고양이가 밥을 먹었어요."]
REF = ["나는 어제 학교에 갔어요.", "고양이는 밥을 먹었어요."]


@pytest.fixture
def fresh_tokenizer_choice():
    bleu_tokenizer_for.cache_clear()
    yield
    bleu_tokenizer_for.cache_clear()


def test_korean_bleu_uses_mecab(fresh_tokenizer_choice) -> None:
    pytest.importorskip("mecab_ko", reason="sacrebleu[ko] is not installed (pip install 'bertnmt[ko]')")
    assert bleu_tokenizer_for("ko") == "ko-mecab"
    score = corpus_scores(HYP, REF, "ko")
    direct = sacrebleu.corpus_bleu(HYP, [REF], tokenize="ko-mecab")
    assert score.bleu == round(direct.score, 2) and "|tok:ko-mecab" in score.bleu_signature
    # morphemes, not eojeol: the shared stems count, unlike with 13a
    assert score.bleu > sacrebleu.corpus_bleu(HYP, [REF], tokenize="13a").score


def test_korean_without_mecab_falls_back_to_characters(fresh_tokenizer_choice, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import sacrebleu.tokenizers.tokenizer_ko_mecab as ko_mecab

    monkeypatch.setattr(ko_mecab, "MeCab", None)  # as if mecab-ko were not installed
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert bleu_tokenizer_for("ko") == "char"
    assert "pip install sacrebleu[ko]" in caplog.text
    assert "|tok:char" in corpus_scores(HYP, REF, "ko").bleu_signature


def test_paper_style_is_case_insensitive_bleu_on_moses_tokens() -> None:
    opts = paper_options("de")
    assert opts == BleuOptions(tokenize="none", lowercase=True, moses_lang="de")
    hyp, ref = ["Ein Mann, der läuft."], ["ein Mann , der läuft ."]
    score = corpus_scores(hyp, ref, "de", options=opts)
    assert score.bleu == 100.0 and score.bleu_signature.startswith("nrefs:1|case:lc|eff:no|tok:none")
    assert corpus_scores(hyp, ref, "de").bleu < 100.0  # the default is case-sensitive
    assert paper_options("ko").tokenize == bleu_tokenizer_for("ko") and paper_options("ko").lowercase
