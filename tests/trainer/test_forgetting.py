"""The forgetting guard on real training: a stage that makes an evaluation suite worse than its `maxRegression`
fails with ForgettingDetected, and its output model is not written."""

import pytest
from stage_helpers import DATA

from finetune_api.reasons import PERMANENT, Reason
from finetune_trainer.errors import StageError

pytestmark = pytest.mark.train

# Nothing like the addition facts of the suite: letters and words the domain never uses.
UNRELATED = [f"{word} {word[::-1]} {word.upper()} zz qq xx." for word in ("abcde", "fghij", "klmno", "vwxyz") * 20]


def test_a_stage_trained_hard_on_unrelated_text_fails_with_forgetting_detected(render, run_in_process, tmp_path):
    unrelated = tmp_path / "unrelated.txt"
    unrelated.write_text("\n".join(UNRELATED) + "\n")
    suite = {"name": "domain", "uri": str(DATA / "heldout" / "domain.txt"), "maxRegression": 0.5}
    config = render(
        {"type": "cpt", "dataset": {"uri": str(unrelated)}},
        training={"maxSteps": 12, "learningRate": 1e-2},
        evaluation={"suites": [suite]},
    )
    with pytest.raises(StageError) as failure:
        run_in_process(config)
    assert failure.value.reason == Reason.FORGETTING_DETECTED and Reason.FORGETTING_DETECTED in PERMANENT
    message = str(failure.value)
    assert "suite 'domain' loss went from" in message and "more than its maxRegression 0.5" in message, message
    assert not (tmp_path / "artifacts" / "cpt" / "model").exists()


def test_suites_report_before_and_after_for_every_suite(render, run_in_process):
    suites = [
        {"name": "domain", "uri": str(DATA / "heldout" / "domain.txt")},
        {
            "name": "choices",
            "type": "multipleChoice",
            "uri": str(DATA / "heldout" / "domain_choices.jsonl"),
            "maxSamples": 12,
        },
    ]
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}},
        training={"maxSteps": 30},
        evaluation={"suites": suites},
    )
    metrics, report = run_in_process(config)
    assert metrics["domain_loss_after"] < metrics["domain_loss_before"] - 1.0, metrics
    assert metrics["domain_regression"] == pytest.approx(metrics["domain_loss_after"] - metrics["domain_loss_before"])
    for key in ("accuracy", "accuracy_carry", "accuracy_no_carry"):
        assert 0.0 <= metrics[f"choices_{key}_after"] <= 1.0, metrics
    assert report.metrics["domain_loss_after"] == metrics["domain_loss_after"]
