"""metrics.jsonl and the experiment trackers: every logged step is kept, TensorBoard writes under the stage, MLflow
writes where MLFLOW_TRACKING_URI says (a file store here) and nothing secret lands in the stage's own outputs."""

from __future__ import annotations

import json

import pytest
from stage_helpers import DATA, mlflow_runs

from finetune_trainer.errors import ConfigError, QualityGateError

pytestmark = pytest.mark.train


def test_cpt_keeps_every_logged_step_and_writes_tensorboard_under_the_stage(render, run_in_process, tmp_path):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
        training={"maxSteps": 6, "loggingSteps": 2, "reportTo": ["tensorboard"]},
    )
    metrics, _ = run_in_process(config)
    stage_dir = tmp_path / "artifacts" / "cpt"
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "loss" in row and not row.get("final")] == [2, 4, 6]
    # Throughput counts the attention mask: full 64-token blocks, 16 a step, until the short block at the data's end.
    assert [row["num_input_tokens_seen"] for row in history if "loss" in row] == [2048, 4096, 6096]
    assert all(row["tokens_per_second"] > 0 for row in history if "loss" in row)
    assert any("eval_loss" in row for row in history)  # held-out evaluations are logged steps too
    assert history[-1]["final"] and history[-1]["eval_loss_after"] == pytest.approx(metrics["eval_loss_after"])
    events = list((stage_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert any(b"train/loss" in event.read_bytes() for event in events), events
    assert any(b"train/tokens_per_second" in event.read_bytes() for event in events), events


def test_cpt_logs_every_step_and_its_evaluation_into_one_mlflow_run(render, run_in_process, tmp_path, mlflow_store):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}},
        training={"maxSteps": 6, "loggingSteps": 2, "reportTo": ["mlflow"]},
    )
    metrics, report = run_in_process(config)
    client, runs = mlflow_runs(mlflow_store)
    # One run for the stage: the held-out evaluation after training is in it, not in a run of its own.
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "test-cpt"
    run = runs[0].info.run_id
    assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(run, "loss")] == [
        (row["step"], round(row["loss"], 6))
        for row in map(json.loads, (tmp_path / "artifacts" / "cpt" / "metrics.jsonl").read_text().splitlines())
        if "loss" in row and not row.get("final")
    ]
    assert len(client.get_metric_history(run, "tokens_per_second")) == 3
    assert client.get_metric_history(run, "eval_loss")[-1].value == pytest.approx(metrics["eval_loss_after"])
    assert runs[0].data.params["learning_rate"] == str(config.training.learning_rate)
    outputs = [path.read_text() for path in (tmp_path / "artifacts" / "cpt").glob("*.json*")]
    assert all("hunter2" not in text for text in [*outputs, report.model_dump_json(), json.dumps(runs[0].data.params)])


def test_the_mlflow_run_of_a_failed_stage_ends_failed(render, run_in_process, mlflow_store):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}},
        training={
            "maxSteps": 2,
            "loggingSteps": 1,
            "learningRate": 1e-6,
            "minImprovement": 0.5,
            "reportTo": ["mlflow"],
        },
    )
    with pytest.raises(QualityGateError):
        run_in_process(config)
    client, runs = mlflow_runs(mlflow_store)
    assert [run.info.status for run in runs] == ["FAILED"]
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]


def test_mlflow_without_a_tracking_uri_is_a_config_error_before_training(render, run_in_process, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
        training={"maxSteps": 2, "reportTo": ["mlflow"]},
    )
    with pytest.raises(ConfigError, match=r"spec.training.reportTo: 'mlflow' needs MLFLOW_TRACKING_URI"):
        run_in_process(config)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match=r"file store file:///tmp/mlruns needs MLFLOW_ALLOW_FILE_STORE=true"):
        run_in_process(config)


def test_a_tracker_whose_package_is_missing_is_a_config_error_naming_the_field(render, run_in_process):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
        training={"maxSteps": 2, "reportTo": ["wandb"]},
    )
    with pytest.raises(ConfigError, match=r"spec.training.reportTo: 'wandb' needs the wandb package"):
        run_in_process(config)
