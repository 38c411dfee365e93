"""What `finetune run` shows: the pipeline ETA and the plain lines off a terminal."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from finetune_api.report import StageReport
from finetune_api.status import FineTuneJobStatus, StageStatus
from finetune_trainer.display import PlainDisplay, pipeline_eta


def status_of(*phases: str, finished_in: int = 100) -> FineTuneJobStatus:
    """A pipeline's status with stages in `phases`; the succeeded ones took `finished_in` seconds each."""
    stages = [StageStatus(name=f"s{i}", type="sft", phase=phase) for i, phase in enumerate(phases)]
    for stage in stages:
        if stage.phase == "Succeeded":
            start = datetime(2026, 1, 1, tzinfo=UTC)
            stage.start_time, stage.completion_time = (
                f"{moment:%Y-%m-%dT%H:%M:%SZ}" for moment in (start, start + timedelta(seconds=finished_in))
            )
    return FineTuneJobStatus(stages=stages, progress=f"{phases.count('Succeeded')}/{len(phases)}")


@pytest.mark.unit
def test_the_pipeline_eta_is_the_running_stages_plus_the_pending_ones_at_the_average_duration():
    running = StageReport(phase="Running", step=5, total_steps=20, eta_seconds=30.0)
    assert pipeline_eta(status_of("Succeeded", "Running", "Pending", "Pending", finished_in=120), running) == 270.0
    assert pipeline_eta(status_of("Succeeded", "Running"), running) == 30.0


@pytest.mark.unit
def test_the_pipeline_eta_is_unknown_until_the_running_stage_has_one_and_a_stage_finished():
    assert pipeline_eta(status_of("Running"), StageReport(phase="Running")) is None  # no step done yet
    assert pipeline_eta(status_of("Running"), None) is None
    with_eta = StageReport(phase="Running", step=5, total_steps=20, eta_seconds=30.0)
    assert pipeline_eta(status_of("Running", "Pending"), with_eta) is None  # how long a stage takes is not known yet
    assert pipeline_eta(status_of("Succeeded", "Succeeded"), None) == 0.0


@pytest.mark.unit
def test_a_plain_progress_line_has_step_loss_tokens_per_second_and_both_etas():
    out = io.StringIO()
    report = StageReport(phase="Running", step=10, total_steps=40, loss=2.5, eta_seconds=75.0, tokens_per_second=1234.5)
    PlainDisplay(out).update(status_of("Succeeded", "Running", finished_in=60), "s1", report)
    assert out.getvalue() == "[s1] step 10/40 loss 2.5000 1,234 tok/s eta 1:15 | pipeline eta 1:15\n"
