"""Sample FineTuneJobs for the controller's unit tests (no API server involved)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from finetune_operator.builders import JobRef

SAMPLE_SPEC: dict[str, Any] = {
    "model": {"source": "s3://models/base", "credentialsSecret": "model-creds"},
    "storage": {"uri": "s3://runs/demo", "credentialsSecret": "s3-creds"},
    "resources": {
        "workers": 2,
        "gpusPerWorker": 1,
        "cpusPerWorker": 4,
        "memoryPerWorker": "16Gi",
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "envFromSecrets": ["wandb"],
    "backoffLimit": 2,
    "stages": [
        {"name": "sft", "type": "sft", "dataset": {"uri": "pvc://data/instruct.jsonl"}},
        {
            "name": "reward",
            "type": "reward",
            "dataset": {"uri": "s3://data/prefs.jsonl", "credentialsSecret": "data-creds"},
        },
        {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
    ],
}


def _sample_spec(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SAMPLE_SPEC)
    spec.update(changes)
    return spec


@pytest.fixture
def sample_spec():
    """A function returning a fresh three-stage spec (wire form), with top-level fields replaced by its arguments."""
    return _sample_spec


@pytest.fixture
def job() -> JobRef:
    return JobRef(
        name="demo",
        namespace="ml",
        uid="uid-1234",
        generation=3,
        labels={"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high", "other": "x"},
    )
