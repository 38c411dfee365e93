"""The report channel between trainer and operator."""

from finetune_api.report import StageReport


def test_a_report_from_a_newer_trainer_is_read_with_its_unknown_fields_ignored():
    report = StageReport.model_validate_json('{"phase": "Failed", "reason": "OutOfMemory", "fieldOfTomorrow": [1]}')
    assert (report.phase, report.reason) == ("Failed", "OutOfMemory")
    assert "fieldOfTomorrow" not in report.to_wire()
