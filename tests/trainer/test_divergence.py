"""A diverged model is a failure: NaN/inf losses or weights fail the stage with TrainingDiverged, nothing is saved as
its output, and no report or status carries a non-finite number. The held-out loss gate (`minImprovement`)."""

import json

import pytest
from stage_helpers import DATA

from finetune_api.reasons import PERMANENT, Reason
from finetune_api.report import StageReport
from finetune_trainer.errors import StageError

pytestmark = pytest.mark.train


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-finite number {constant} in a report")

    return json.loads(text, parse_constant=refuse)


def test_a_learning_rate_far_too_high_fails_with_training_diverged(render, tmp_path):
    from finetune_trainer.reporting import FileReporter
    from finetune_trainer.stage import run_stage

    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        training={"maxSteps": 10, "saveSteps": 5, "loggingSteps": 1},
    )
    # The spec refuses learningRate > 1 now; the trainer must still catch a run that diverges for any reason.
    training = config.training.model_copy(update={"learning_rate": 1e38})
    config = config.model_copy(update={"training": training})
    report_file = tmp_path / "report.json"
    with pytest.raises(StageError) as failure:
        run_stage(config, FileReporter(report_file, min_interval=0), use_ray=False)
    assert failure.value.reason == Reason.TRAINING_DIVERGED and failure.value.permanent
    assert Reason.TRAINING_DIVERGED in PERMANENT
    assert "loss nan" in str(failure.value) and "Lower training.learningRate" in str(failure.value)
    report = StageReport.model_validate(_strict_json(report_file.read_text()))
    assert report.phase == "Failed" and report.reason == "TrainingDiverged"
    assert not (tmp_path / "artifacts" / "sft" / "model").exists()  # nothing for the next stage to start from


def test_min_improvement_gate_fails_a_stage_whose_held_out_loss_barely_moves(render, run_in_process):
    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        training={"maxSteps": 2, "learningRate": 1e-6, "minImprovement": 0.5},
    )
    with pytest.raises(StageError) as failure:
        run_in_process(config)
    assert failure.value.reason == Reason.QUALITY_GATE_FAILED
    assert "minImprovement 0.5" in str(failure.value)


def test_reports_never_carry_non_finite_numbers():
    read = StageReport.model_validate_json('{"phase": "Running", "loss": NaN, "metrics": {"a": NaN, "b": 1.5}}')
    assert read.loss is None and read.metrics == {"b": 1.5}
    written = StageReport(phase="Succeeded")
    written.loss, written.eta_seconds = float("inf"), float("nan")  # assigned in place, as the trainer does
    written.metrics["eval_loss_after"] = float("nan")
    wire = _strict_json(json.dumps(written.to_wire()))
    assert wire["metrics"] == {} and wire.get("loss") is None and wire.get("etaSeconds") is None
