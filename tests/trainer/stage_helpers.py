"""Helpers shared by the trainer tests: paths, small job specs and running the CLI from the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from finetune_api.spec import FineTuneJobSpec
from finetune_dev.testing import source_env

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"

# Small and fast: enough steps for the tiny model to learn the toy data on two CPU cores within seconds.
FAST_TRAINING = {
    "maxSteps": 30,
    "batchSize": 16,
    "maxLength": 64,
    "learningRate": 3e-3,
    "loggingSteps": 5,
    "saveSteps": 1000,
}


def job_spec(
    model: Path | str,
    storage: Path | str,
    stages: list[dict],
    peft: str = "full",
    training: dict | None = None,
    model_options: dict | None = None,
    **extra,
) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(model), **(model_options or {})},
            "storage": {"uri": str(storage)},
            "peft": {"method": peft, "r": 16, "alpha": 32, "dropout": 0.0},
            "training": {**FAST_TRAINING, **(training or {})},
            "stages": stages,
            **extra,
        }
    )


def write_manifest(path: Path, spec: dict, name: str = "e2e") -> Path:
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
        )
    )
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m finetune_trainer ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_trainer", *args],
        cwd=REPO,
        env=source_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stage_command(config, report: Path, no_ray: bool = True) -> list[str]:
    """argv of the stage entrypoint (the operator's) for `config`, reporting into the file `report`."""
    argv = [sys.executable, "-m", "finetune_trainer.stage", "--config-json", config.model_dump_json()]
    return argv + ["--report", f"file://{report}", *(["--no-ray"] if no_ray else [])]


def mlflow_runs(store: Path) -> tuple:
    """(an MlflowClient on the file store `store`, every run in it)."""
    import mlflow

    client = mlflow.MlflowClient(f"file://{store}")
    return client, client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
