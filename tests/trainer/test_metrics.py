"""Exact match, ROUGE-L (own LCS) and sacreBLEU BLEU with effective order against hand-computed golden values."""

import pytest

from finetune_trainer.metrics import corpus_bleu, exact_match, mean_rouge_l, rouge_l, sentence_bleu
from finetune_trainer.recipes.evaluation import round_robin, score_predictions

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
    # rouge-score's tokenizer: punctuation separates and is dropped, so "7." matches "7"; "is 7." vs "7": P = 1/2, R = 1.
    assert rouge_l("7.", "7") == 1.0
    assert rouge_l("it is 7.", "7") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    # LCS("3 plus 4 is 7", "4 plus 3 is 7") = "plus is 7" or "3 is 7" (3 of 5 each side): F = 3/5.
    assert rouge_l("3 plus 4 is 7", "4 plus 3 is 7") == pytest.approx(3 / 5)
    assert rouge_l("...", "7") == 0.0


def test_exact_match_and_short_answer_bleu_golden_values():
    assert exact_match(" 7 ", "7") == 1.0 and exact_match("7.", "7") == 0.0 and exact_match("a  b", "a b") == 1.0
    # 8 of 30 one-word answers right: only unigrams exist, so with effective order BLEU = 100 * 8/30 (no brevity
    # penalty: every output has the reference's length). Plain 4-gram BLEU is 0 here.
    predictions = [str(n) for n in range(8)] + ["0"] * 22
    references = [str(n) for n in range(8)] + ["1"] * 22
    assert corpus_bleu(predictions, references) == pytest.approx(100 * 8 / 30)
    assert sentence_bleu("7", "7") == pytest.approx(100.0) and sentence_bleu("8", "7") == 0.0
    # Two words: unigram precision 2/2, bigram 1/1 -> 100; "7 is" vs "is 7": 2/2 and 0/1 (smoothed to 1/2) -> sqrt(0.5).
    assert sentence_bleu("is 7", "is 7") == pytest.approx(100.0)
    assert sentence_bleu("7 is", "is 7") == pytest.approx(100 * 0.5**0.5)


def test_metrics_per_task_and_round_robin_sampling():
    tasks = ["a", "a", "a", "b", "b"]
    assert round_robin(tasks) == [0, 3, 1, 4, 2]
    metrics = score_predictions(["1", "2", "x", "4", "y"], ["1", "2", "3", "4", "5"], tasks)
    assert metrics["exact_match"] == pytest.approx(3 / 5)
    assert metrics["exact_match_a"] == pytest.approx(2 / 3) and metrics["exact_match_b"] == pytest.approx(1 / 2)
    assert metrics["bleu_a"] == pytest.approx(100 * 2 / 3) and metrics["rougeL_b"] == pytest.approx(0.5)
    assert "exact_match_default" not in score_predictions(["1"], ["1"], ["default"])


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
