"""ROUGE-L (own LCS) and sacreBLEU corpus BLEU against hand-computed golden values."""

import pytest

from finetune_trainer.metrics import corpus_bleu, mean_rouge_l, rouge_l

pytestmark = pytest.mark.unit


def test_rouge_l_golden_values():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 words; P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" (2); P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7.
    assert rouge_l("a b c", "a x c y") == pytest.approx(4 / 7)
    assert rouge_l("Seven", "seven") == 1.0  # case-insensitive
    assert rouge_l("", "seven") == 0.0
    assert rouge_l("eight", "seven") == 0.0
    assert mean_rouge_l(["7", "9"], ["7", "8"]) == pytest.approx(0.5)


def test_corpus_bleu_golden_values():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["completely different words here"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    # n-gram precisions 5/6, 3/5, 1/4, 0/3; sacreBLEU's default `exp` smoothing turns the first zero count into 1/(2*3);
    # equal lengths so no brevity penalty: 100 * (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = 37.99.
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(37.9918, abs=0.001)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        mean_rouge_l(["a"], [])
