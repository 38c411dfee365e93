"""Evaluation suites: golden values for the scoring math, on the tiny model turned into a known unigram model.

With the output head replaced by a zero-weight layer whose bias is chosen here, the model predicts the same
distribution at every position: log p(t) = bias[t] - logsumexp(bias). Every score is then computable by hand.
"""

from __future__ import annotations

import json
import math

import pytest

from finetune_api.spec import EvaluationSuite
from finetune_trainer.recipes import suites

FAVOURED = math.log(8.0)  # " 7" is 8 times as likely as any other token


@pytest.fixture(scope="module")
def unigram(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    vocab = model.config.vocab_size
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        (seven,) = tokenizer(" 7", add_special_tokens=False)["input_ids"]
        head.bias[seven] = FAVOURED
    model.lm_head = head
    # Golden per-token log-probabilities: the favoured token and every other one.
    normaliser = math.log(vocab - 1 + 8.0)
    return model, tokenizer, FAVOURED - normaliser, -normaliser


def test_text_loss_is_the_mean_negative_log_likelihood_per_token(unigram):
    model, tokenizer, _, other = unigram
    # No " 7" in the text: every scored token has log-probability `other`, whatever the lengths and batch padding.
    pairs = [("", "3 plus 4 is 8."), ("", "1 plus 1 is 2. 2 plus 2 is 4."), ("What is 3 plus 1?", " 4")]
    assert suites.text_loss(model, tokenizer, pairs, max_length=64) == pytest.approx(-other, rel=1e-5)


def test_multiple_choice_accuracy_on_a_hand_checked_set(unigram, tmp_path):
    model, tokenizer, favoured, other = unigram
    rows = [
        # The model prefers " 7": right when it is the answer, wrong when it is not.
        {"question": "3 plus 4 is", "choices": ["7", "3"], "answer": 0, "task": "sums"},
        {"question": "1 plus 2 is", "choices": ["3", "7"], "answer": 0, "task": "trap"},
        # Per token, "7 3 3 3 3" scores (favoured + 4 other) / 5 > other; summed it would lose to "3" (5 tokens of
        # which 4 are unlikely): only the length normalisation picks the answer.
        {"question": "the sequence is", "choices": ["7 3 3 3 3", "3"], "answer": 0, "task": "sums"},
    ]
    assert (favoured + 4 * other) / 5 > other and favoured + 4 * other < other
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    parsed = [suites.ChoiceRow(row["question"], tuple(row["choices"]), row["answer"], row["task"]) for row in rows]
    assert suites.choice_accuracy(model, tokenizer, parsed, max_length=64) == {
        "accuracy": pytest.approx(2 / 3),
        "accuracy_sums": 1.0,
        "accuracy_trap": 0.0,
    }


def test_the_gate_names_the_suite_and_how_much_worse_it_got(render):
    from finetune_trainer.errors import ForgettingError

    config = render(
        {"type": "sft", "dataset": {"uri": "examples/data/instruct.jsonl"}},
        evaluation={"suites": [{"name": "domain", "uri": "domain.txt", "maxRegression": 0.5}]},
    )
    suite = config.suites[0]
    ok = suites.suite_metrics(suite, {"loss": 1.7, "perplexity": 5.5}, {"loss": 2.1, "perplexity": 8.2})
    suites.check_forgetting(config, ok)
    bad = suites.suite_metrics(suite, {"loss": 1.695, "perplexity": 5.4}, {"loss": 5.418, "perplexity": 225.0})
    assert bad["domain_loss_before"] == 1.695 and bad["domain_loss_after"] == 5.418
    with pytest.raises(ForgettingError, match=r"suite 'domain' loss went from 1.6950 to 5.4180, 3.7230 worse"):
        suites.check_forgetting(config, bad)


def test_multiple_choice_rows_are_validated_with_row_and_expectation(render, tmp_path):
    from finetune_trainer.errors import DataValidationError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1 plus 1 is", "choices": ["2", "3"], "answer": 2}) + "\n")
    config = render(
        {"type": "sft", "dataset": {"uri": "x.jsonl"}},
        evaluation={"suites": [{"name": "mc", "type": "multipleChoice", "uri": str(path)}]},
    )
    with pytest.raises(DataValidationError, match=r"row 1: `answer` is 2; expected the index \(0-1\)"):
        suites.load_suite(config, config.suites[0], tmp_path / "cache")


def test_reward_stages_are_not_scored_by_default():
    from finetune_api.render import render_stage
    from finetune_api.spec import FineTuneJobSpec

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": "m"},
            "storage": {"uri": "out"},
            "evaluation": {"suites": [EvaluationSuite(name="domain", uri="d.txt").to_wire()]},
            "stages": [
                {"name": "sft", "type": "sft", "dataset": {"uri": "i.jsonl"}},
                {"name": "reward", "type": "reward", "dataset": {"uri": "p.jsonl"}},
            ],
        }
    )
    assert [s.name for s in render_stage("j", spec, "sft").suites] == ["domain"]
    assert render_stage("j", spec, "reward").suites == []
