"""`kubectl finetune status` against the real apiserver prints the same table as `finetune status`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune_api.status import FineTuneJobStatus
from finetune_api.table import stage_table, summary_line
from finetune_dev.testing import source_env
from finetune_operator.kube import FINETUNEJOB, Kube
from finetune_operator.plugin import logs_command

pytestmark = pytest.mark.k8s

STATUS = {
    "phase": "Running",
    "progress": "1/2",
    "currentStage": "align",
    "conditions": [{"type": "Running", "status": "True", "reason": "StageRunning", "message": "align step 3/40"}],
    "stages": [
        {
            "name": "tune",
            "type": "sft",
            "phase": "Succeeded",
            "attempts": 1,
            "rayJob": "demo-tune-1",
            "metrics": {"eval_loss_after": 0.9},
            "checkpoint": "s3://runs/demo/tune/model",
        },
        {"name": "align", "type": "dpo", "phase": "Running", "attempts": 2, "rayJob": "demo-align-2"},
    ],
}


def test_status_prints_the_stage_table(control_plane, namespace):
    admin = Kube.connect(str(control_plane.kubeconfig))
    admin.create(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": namespace},
            "spec": {
                "model": {"source": "s3://models/base"},
                "storage": {"uri": "s3://runs/demo"},
                "stages": [
                    {"name": "tune", "type": "sft", "dataset": {"uri": "s3://data/a.jsonl"}},
                    {"name": "align", "type": "dpo", "dataset": {"uri": "s3://data/b.jsonl"}},
                ],
            },
        }
    )
    admin.patch_job_status(namespace, "demo", STATUS)
    argv = [sys.executable, "-m", "finetune_operator.plugin", "--kubeconfig", str(control_plane.kubeconfig)]
    shown = subprocess.run([*argv, "-n", namespace, "status", "demo"], env=source_env(), capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    status = FineTuneJobStatus.model_validate(admin.get(FINETUNEJOB, namespace, "demo")["status"])
    assert shown.stdout.splitlines() == [summary_line(status), "", *stage_table(status)]
    assert shown.stdout.splitlines()[0] == "Running 1/2: StageRunning: align step 3/40"

    missing = subprocess.run(
        [*argv, "-n", namespace, "status", "nope"], env=source_env(), capture_output=True, text=True
    )
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_logs_follow_the_stage_rayjob_submitter():
    status = FineTuneJobStatus.model_validate(STATUS)
    assert logs_command(status, "ml", None) == ["kubectl", "logs", "job/demo-align-2", "-n", "ml", "--all-containers"]
    assert logs_command(status, "ml", "tune")[2] == "job/demo-tune-1"
    with pytest.raises(SystemExit, match="no stage 'rm'"):
        logs_command(status, "ml", "rm")


def test_the_documented_wait_recipe_returns_on_failure_and_on_success(control_plane, namespace):
    """docs/walkthrough.md: wait for completionTime (set on success and on failure alike), then read the phase;
    `--for=condition=Ready` and `--for=condition=Stalled` are the kstatus-style alternatives."""
    admin = Kube.connect(str(control_plane.kubeconfig))
    for name, phase, ready, stalled in (("ok", "Succeeded", "True", "False"), ("bad", "Failed", "False", "True")):
        admin.create(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "model": {"source": "s3://models/base"},
                    "storage": {"uri": "s3://runs/x"},
                    "stages": [{"name": "tune", "type": "sft", "dataset": {"uri": "s3://data/a.jsonl"}}],
                },
            }
        )
        conditions = [
            {"type": "Ready", "status": ready, "reason": "X", "message": ""},
            {"type": "Stalled", "status": stalled, "reason": "X", "message": ""},
        ]
        admin.patch_job_status(
            namespace, name, {"phase": phase, "completionTime": "2026-12-01T10:00:00Z", "conditions": conditions}
        )
        waited = control_plane.kubectl(
            "wait", f"ftj/{name}", "-n", namespace, "--for=jsonpath={.status.completionTime}", "--timeout=20s"
        )
        assert waited.returncode == 0
        got = control_plane.kubectl("get", f"ftj/{name}", "-n", namespace, "-o", "jsonpath={.status.phase}")
        assert got.stdout == phase
        verdict = "Ready" if phase == "Succeeded" else "Stalled"
        assert (
            control_plane.kubectl(
                "wait", f"ftj/{name}", "-n", namespace, f"--for=condition={verdict}", "--timeout=20s"
            ).returncode
            == 0
        )
