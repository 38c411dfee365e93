"""One state machine: `finetune run` and the operator (local executor) write the same status for the same manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune_dev.testing import REPO_ROOT, OperatorProcess, install_chart_rbac, source_env
from finetune_operator.kube import FINETUNEJOB, Kube

pytestmark = [pytest.mark.k8s, pytest.mark.train]

DATA = REPO_ROOT / "examples" / "data"
FAST = {"FINETUNE_RETRY_BASE_SECONDS": "2", "FINETUNE_RESYNC_SECONDS": "5", "FINETUNE_LOCAL_POLL_SECONDS": "1"}
# What may differ between two runs: when things happened, and how long the trainer expected them to take.
TIMES = {"startTime", "completionTime", "lastTransitionTime", "etaSeconds"}


def manifest(model: Path, storage: Path) -> dict:
    training = {"maxSteps": 8, "batchSize": 8, "maxLength": 64, "learningRate": 3e-3, "loggingSteps": 4}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "parity"},
        "spec": {
            "model": {"source": str(model)},
            "storage": {"uri": str(storage)},
            "training": training,
            "stages": [
                {"name": "domain", "type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
                {"name": "instruct", "type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
            ],
        },
    }


def comparable(status: dict, storage: Path) -> dict:
    """The status with times dropped, metric values reduced to their names and the storage root made neutral."""

    def strip(value):
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key not in TIMES}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    document = strip(json.loads(json.dumps(status).replace(str(storage), "<storage>")))
    for stage in document["stages"]:
        stage["metrics"] = sorted(stage["metrics"])
    return document


def test_finetune_run_and_the_operator_write_the_same_status(control_plane, namespace, tmp_path):
    model = tmp_path / "tiny"
    env = source_env()
    subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "tiny-model", str(model), "--data-dir", str(DATA)],
        check=True,
        env=env,
        capture_output=True,
    )

    local_storage = tmp_path / "local"
    local_manifest = tmp_path / "job.yaml"
    local_manifest.write_text(yaml.safe_dump(manifest(model, local_storage)))
    run = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "run", str(local_manifest), "--no-ray"],
        env=source_env(**FAST),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    local = json.loads((local_storage / "status.json").read_text())

    cluster_storage = tmp_path / "cluster"
    kubeconfig = install_chart_rbac(control_plane, f"op-{namespace}", namespace, "local", [namespace])
    operator = OperatorProcess(
        kubeconfig, tmp_path / "operator.log", "local", (namespace,), state_dir=tmp_path / "state", env=FAST
    )
    with operator:
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest(model, cluster_storage)))
        admin = Kube.connect(str(control_plane.kubeconfig))
        deadline = time.monotonic() + 600
        while (admin.get(FINETUNEJOB, namespace, "parity") or {}).get("status", {}).get("phase") not in (
            "Succeeded",
            "Failed",
        ):
            assert time.monotonic() < deadline, operator.log_tail()
            time.sleep(1)
        cluster = admin.get(FINETUNEJOB, namespace, "parity")["status"]

    assert cluster["phase"] == "Succeeded", json.dumps(cluster, indent=1)
    assert comparable(local, local_storage) == comparable(cluster, cluster_storage)
