"""Fixtures for trainer tests: the tiny model (built once), stage configs rendered from small specs, stage runners, S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage_helpers import DATA, job_spec

from finetune_api.render import StageConfig, render_stage
from finetune_api.report import StageReport


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from finetune_trainer.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), DATA)


@pytest.fixture
def render(tmp_path, tiny_model_dir):
    """render(stage_dict, peft=..., training=..., **spec fields) -> StageConfig of a one-stage job."""

    def _render(
        stage: dict, peft: str = "full", training: dict | None = None, model_options: dict | None = None, **extra
    ) -> StageConfig:
        stage = {"name": stage["type"], **stage}
        spec = job_spec(
            tiny_model_dir,
            tmp_path / "artifacts",
            [stage],
            peft=peft,
            training=training,
            model_options=model_options,
            **extra,
        )
        return render_stage("test", spec, stage["name"])

    return _render


@pytest.fixture
def run_in_process(tmp_path):
    """Run a stage in this process (no Ray); returns (metrics, final StageReport)."""
    from finetune_trainer.reporting import FileReporter
    from finetune_trainer.stage import run_stage

    def _run(config: StageConfig) -> tuple[dict[str, float], StageReport]:
        report_file = tmp_path / f"{config.stage.name}-report.json"
        metrics = run_stage(config, FileReporter(report_file, min_interval=0), use_ray=False)
        return metrics, StageReport.model_validate(json.loads(report_file.read_text()))

    return _run


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> Path:
    """MLflow's settings as envFromSecrets would give them: a file store, and a password that must stay secret."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-not-for-logs")
    return store


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; yields its endpoint URL. Credentials are dummies moto accepts."""
    from moto.server import ThreadedMotoServer

    from finetune_dev.testing import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the moto server; AWS_* variables point boto3 (and child processes) at it."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
