"""The controller with runtimes against a real kube-apiserver: the runtime is read before the first stage starts, the
effective spec lands in status and drives the rendered configs, later runtime edits change nothing, a missing
runtime is waited for and a policy violation fails the job naming the field."""

from __future__ import annotations

from typing import Any

import test_controller
from test_controller import Harness, rendered_config, rj

from finetune_api.reasons import Reason
from finetune_operator.kube import RUNTIME

# The controller tests' operator process and cluster stand-ins.
harness = test_controller.harness


def runtime_manifest(name: str, workers: int = 2, **policy: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneRuntime",
        "metadata": {"name": name},
        "spec": {
            "queueName": "team-a",
            "defaults": {
                "model": {"source": "s3://models/base"},
                "storage": {"uri": "s3://runs/team-a"},
                "resources": {"workers": workers, "cpusPerWorker": 2},
                "training": {"maxSteps": 20},
                "backoffLimit": 1,
            },
            "policy": policy,
        },
    }


def job_manifest(name: str, runtime: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "runtimeRef": {"kind": "FineTuneRuntime", "name": runtime},
            "stages": [
                {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}},
                {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
            ],
            **spec,
        },
    }


def test_the_effective_spec_drives_the_stages_and_runtime_edits_change_nothing(harness: Harness):
    harness.create(runtime_manifest("team"))
    harness.create(job_manifest("merged", "team", training={"batchSize": 4}))
    first = harness.wait_for_rayjob(rj("merged", "sft", 1))
    config = rendered_config(harness, first)
    assert config.input_model == "s3://models/base"
    assert config.output_uri == f"s3://runs/team-a/{harness.namespace}/merged/sft/model"
    assert (config.resources.workers, config.resources.cpus_per_worker) == (2, 2)
    assert (config.training.max_steps, config.training.batch_size) == (20, 4)
    # The runtime's queue reaches the RayJob, so Kueue admits it against the team's quota.
    assert first["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    status = harness.status("merged")
    assert status["effectiveSpec"]["resources"]["workers"] == 2
    assert status["runtime"]["name"] == "team" and status["runtime"]["generation"] == 1

    runtime = harness.admin.get(RUNTIME, harness.namespace, "team")
    runtime["spec"]["defaults"]["resources"]["workers"] = 3
    harness.admin.request("PUT", harness.admin.path(RUNTIME, harness.namespace, "team"), runtime)
    harness.kueue_admits(rj("merged", "sft", 1))
    harness.kuberay_sets(rj("merged", "sft", 1), "failed")
    retry = harness.wait_for_rayjob(rj("merged", "sft", 2))
    assert rendered_config(harness, retry).resources.workers == 2
    after = harness.status("merged")
    assert after["effectiveSpec"] == status["effectiveSpec"] and after["runtime"]["generation"] == 1


def test_a_missing_runtime_is_waited_for(harness: Harness):
    harness.create(job_manifest("early", "later"))
    condition = harness.wait_for_condition("early", "Running", status="False", reason=Reason.RUNTIME_NOT_FOUND)
    assert "FineTuneRuntime 'later'" in condition["message"] and "spec.runtimeRef" in condition["message"]
    assert harness.rayjobs("early") == [] and harness.status("early")["phase"] == "Pending"
    harness.create(runtime_manifest("later"))
    harness.wait_for_rayjob(rj("early", "sft", 1))


def test_a_policy_violation_fails_the_job_naming_the_field(harness: Harness):
    harness.create(runtime_manifest("strict", maxWorkers=4, lockedFields=["resources.nodeSelector"]))
    harness.create(job_manifest("greedy", "strict", resources={"workers": 12, "nodeSelector": {"pool": "x"}}))
    condition = harness.wait_for_condition("greedy", "Failed", reason=Reason.POLICY_VIOLATION)
    assert condition["message"] == (
        "spec.resources.nodeSelector: locked by runtime strict; "
        "spec.resources.workers: 12 is more than the runtime's policy.maxWorkers 4"
    )
    assert harness.rayjobs("greedy") == []
