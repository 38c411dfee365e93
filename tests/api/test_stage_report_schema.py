"""The report channel between trainer and operator."""

from finetune_api.render import STAGE_CONFIG_MAX_BYTES
from finetune_api.report import MESSAGE_MAX_CHARS, StageReport


def test_a_report_from_a_newer_trainer_is_read_with_its_unknown_fields_ignored():
    report = StageReport.model_validate_json('{"phase": "Failed", "reason": "OutOfMemory", "fieldOfTomorrow": [1]}')
    assert (report.phase, report.reason) == ("Failed", "OutOfMemory")
    assert "fieldOfTomorrow" not in report.to_wire()


def test_a_long_failure_message_is_cut_to_fit_the_stage_configmap_beside_the_largest_config():
    # The config may take all but 64 KiB of the ConfigMap's 1 MiB.
    assert MESSAGE_MAX_CHARS * 4 + 16 * 1024 <= 1024 * 1024 - STAGE_CONFIG_MAX_BYTES
    report = StageReport(phase="Failed", reason="TrainingFailed", message="é" * (MESSAGE_MAX_CHARS + 5))
    assert len(report.message) == MESSAGE_MAX_CHARS and report.message.endswith("…")
    # Assigned in place (as the trainer's channel does), it is cut when written.
    report.message = "x" * 100_000
    assert len(report.to_wire()["message"]) == MESSAGE_MAX_CHARS
    assert StageReport(phase="Running", message="short").to_wire()["message"] == "short"
