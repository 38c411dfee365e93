"""Suite-wide settings (CPU DeepSpeed, no telemetry, tests see only the local machine), the tiers, and sample jobs."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from finetune_api.pipeline import JobRef

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tiny models gain nothing from intra-op threads; on 2 cores extra threads only contend with each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tiers that need more than Python; every other test is `unit`.
HEAVY_TIERS = ("k8s", "train")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in HEAVY_TIERS):
            item.add_marker(pytest.mark.unit)


# Sample FineTuneJobs for the state machine's and the controller's unit tests (no API server involved).
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
