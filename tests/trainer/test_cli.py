"""`finetune run` / `finetune stage` end to end: status file shape, skipping finished stages, and failing fast on bad input."""

import json
import subprocess

import pytest
import yaml
from stage_helpers import DATA, FAST_TRAINING, job_spec, run_cli, source_env, stage_command, write_manifest

from finetune_api.render import render_stage
from finetune_api.report import EXIT_PERMANENT_FAILURE
from finetune_api.spec import FineTuneJob
from finetune_api.status import FineTuneJobStatus


def pipeline_spec(model, storage, stages, **training):
    return job_spec(
        model, storage, stages, training={**FAST_TRAINING, "maxSteps": 20, "saveSteps": 10, **training}
    ).model_dump(by_alias=True, exclude_none=True, mode="json")


@pytest.mark.unit
def test_invalid_manifest_prints_file_line_errors_and_exits_2(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        "apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: bad}\nspec:\n  model: {source: x}\n  storage: {uri: /tmp/x}\n  stages:\n    - name: a\n      type: sfx\n      dataset: {uri: d.jsonl}\n"
    )
    result = run_cli("run", str(manifest), timeout=120)
    assert result.returncode == 2
    assert f"{manifest}:9: spec.stages[0].type" in result.stderr


@pytest.mark.train
def test_bad_dataset_fails_before_training_naming_stage_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "broken.jsonl"
    data.write_text(
        '{"prompt": "What is 1 plus 1?", "completion": " 2"}\n{"prompt": "What is 1 plus 2?" "completion": " 3"}\n'
    )
    storage = tmp_path / "out"
    stages = [{"name": "tune", "type": "sft", "dataset": {"uri": str(data)}}]
    manifest = write_manifest(tmp_path / "job.yaml", pipeline_spec(tiny_model_dir, storage, stages))
    result = run_cli("run", str(manifest), "--no-ray")
    # Found by the pre-flight check, before anything ran: exit 2, the field, the file and the line.
    assert result.returncode == 2
    assert f"spec.stages[0].dataset.uri: stage 'tune': {data}:line 2: malformed JSON" in result.stderr
    assert not (storage / "tune").exists() and not (storage / "status.json").exists()

    # The operator's entrypoint: a permanent failure exits 3 and reports the reason.
    config = render_stage("e2e", FineTuneJob.model_validate(yaml.safe_load(manifest.read_text())).spec, "tune")
    report = tmp_path / "report.json"
    stage = subprocess.run(
        stage_command(config, report),
        env=source_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stage.returncode == EXIT_PERMANENT_FAILURE
    wire = json.loads(report.read_text())
    assert wire["phase"] == "Failed" and wire["reason"] == "InvalidDataset" and "line 2" in wire["message"]


@pytest.mark.train
def test_run_cpt_then_sft_writes_status_and_rerun_skips_finished_stages(tmp_path, tiny_model_dir):
    storage = tmp_path / "out"
    stages = [
        {"name": "domain", "type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}},
        {
            "name": "instruct",
            "type": "sft",
            "dataset": {"uri": str(DATA / "instruct.jsonl")},
            "generationEval": {"samples": 4, "maxNewTokens": 3},
        },
    ]
    manifest = write_manifest(tmp_path / "job.yaml", pipeline_spec(tiny_model_dir, storage, stages))
    status_file = tmp_path / "status" / "status.json"
    result = run_cli("run", str(manifest), "--status-file", str(status_file), "--no-ray", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "StageSucceeded: stage domain succeeded" in result.stdout and "eval_loss_after=" in result.stdout
    assert "[domain] step 10/20" in (storage / "domain" / "stage.log").read_text()  # the trainer's own lines

    wire = json.loads(status_file.read_text())
    assert set(wire) >= {"phase", "conditions", "stages", "startTime", "completionTime", "progress"}
    status = FineTuneJobStatus.model_validate(wire)
    assert status.phase == "Succeeded" and status.progress == "2/2"
    # The operator's status shape: no Failed condition on a job that never failed.
    assert {c.type: (c.status, c.reason) for c in status.conditions} == {
        "Running": ("False", "AllStagesSucceeded"),
        "Succeeded": ("True", "AllStagesSucceeded"),
        "Ready": ("True", "AllStagesSucceeded"),
        "Reconciling": ("False", "AllStagesSucceeded"),
        "Stalled": ("False", "AllStagesSucceeded"),
    }
    for stage, name in zip(wire["stages"], ["domain", "instruct"]):
        assert set(stage) >= {
            "name",
            "type",
            "phase",
            "attempts",
            "startTime",
            "completionTime",
            "checkpoint",
            "metrics",
            "message",
        }
        assert stage["name"] == name and stage["phase"] == "Succeeded" and stage["attempts"] == 1
        assert stage["checkpoint"] == str(storage / name / "model")
        assert stage["metrics"]["eval_loss_after"] < stage["metrics"]["eval_loss_before"]
    assert "rougeL" in wire["stages"][1]["metrics"]
    # The sft stage started from the cpt stage's output.
    assert (storage / "domain" / "model" / "config.json").exists() and (
        storage / "instruct" / "model" / "config.json"
    ).exists()

    rerun = run_cli("run", str(manifest), "--status-file", str(status_file), "--no-ray", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[domain] already succeeded" in rerun.stdout and "[instruct] already succeeded" in rerun.stdout
    assert "step " not in rerun.stdout
    again = FineTuneJobStatus.model_validate(json.loads(status_file.read_text()))
    assert [s.attempts for s in again.stages] == [1, 1] and again.phase == "Succeeded"


def test_version_and_status_commands(tmp_path):
    from finetune_api.version import version

    assert run_cli("--version", timeout=60).stdout.strip() == f"finetune {version()}"
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Failed",
            "progress": "1/2",
            "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidDataset", "message": "line 3"}],
            "stages": [
                {"name": "domain", "type": "cpt", "phase": "Succeeded", "metrics": {"eval_loss_after": 1.5}},
                {"name": "instruct", "type": "sft", "phase": "Failed"},
            ],
        }
    )
    (tmp_path / "status.json").write_text(status.model_dump_json(by_alias=True))
    shown = run_cli("status", str(tmp_path), timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == "Failed 1/2: InvalidDataset: line 3"
    assert "domain    cpt   Succeeded" in shown.stdout and "eval_loss_after=1.5" in shown.stdout
    assert run_cli("status", str(tmp_path / "absent"), timeout=60).returncode == 2


@pytest.mark.train
def test_a_broken_file_of_a_later_stage_is_found_before_the_first_stage_trains(tmp_path, tiny_model_dir):
    data = tmp_path / "prefs.jsonl"
    lines = (DATA / "prefs.jsonl").read_text().splitlines()
    lines[36] = '{"prompt": "x", "chosen": 4, "rejected": "y"}'
    data.write_text("\n".join(lines) + "\n")
    storage = tmp_path / "out"
    stages = [
        {"name": "instruct", "type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        {"name": "align", "type": "dpo", "dataset": {"uri": str(data)}},
    ]
    manifest = write_manifest(tmp_path / "job.yaml", pipeline_spec(tiny_model_dir, storage, stages))
    result = run_cli("run", str(manifest), "--no-ray")
    assert result.returncode == 2, result.stderr
    assert "spec.stages[1].dataset" in result.stderr and "line 37" in result.stderr, result.stderr
    assert not (storage / "instruct").exists()  # stage 1 never started
