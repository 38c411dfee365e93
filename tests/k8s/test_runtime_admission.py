"""Runtimes against a real API server: the CRDs install, and the chart's ValidatingAdmissionPolicies refuse a job that
breaks its runtime's policy at create time, naming the field, the same field the operator's own check names."""

from __future__ import annotations

import copy
import json
import re
import time
from typing import Any

import pytest

from finetune_api.runtime import effective_spec
from finetune_dev import ControlPlane
from finetune_dev.crdgen import ADMISSION_POLICY_TEMPLATE, RELEASE_NAME

POLICY = {
    "maxWorkers": 8,
    "maxGpusPerStage": 16,
    "maxActiveDeadlineSeconds": 86400,
    "allowedStageTypes": ["cpt", "sft", "dpo"],
    "allowedImagePrefixes": ["registry.acme.dev/ml/"],
    "allowedModelPrefixes": ["hf://acme/"],
    "lockedFields": ["resources.nodeSelector", "storage"],
}
DEFAULTS = {
    "model": {"source": "hf://acme/base-1b"},
    "storage": {"uri": "s3://ckpts/team-a"},
    "resources": {"workers": 2, "gpusPerWorker": 1, "nodeSelector": {"pool": "gpu"}},
    "activeDeadlineSeconds": 3600,
}


def runtime(kind: str, name: str, policy: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": kind,
        "metadata": meta,
        "spec": {"defaults": DEFAULTS, "policy": policy},
    }


def job(name: str, runtime_name: str, kind: str = "ClusterFineTuneRuntime", **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "runtimeRef": {"kind": kind, "name": runtime_name},
            "stages": [
                {"name": "cpt", "type": "cpt", "dataset": {"uri": "s3://data/corpus.txt"}},
                {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/chat.jsonl"}},
                {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
            ],
            **fields,
        },
    }


def apply(cp: ControlPlane, *documents: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(documents)}))


def dry_run(cp: ControlPlane, namespace: str, document: dict[str, Any]):
    return cp.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(document), check=False)


@pytest.fixture(scope="module")
def policies(control_plane: ControlPlane) -> None:
    """The chart's policy objects as `helm install` creates them (the template without its values switch)."""
    text = ADMISSION_POLICY_TEMPLATE.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("{{")]
    body = "\n".join(lines).replace(RELEASE_NAME, "test")
    control_plane.kubectl("apply", "-f", "-", input=body)
    apply(control_plane, runtime("ClusterFineTuneRuntime", "team-a", POLICY))
    apply(control_plane, runtime("ClusterFineTuneRuntime", "anything-goes", {}))


def refused(cp: ControlPlane, namespace: str, document: dict[str, Any], timeout: float = 60.0) -> str:
    """The API server's refusal; the policies and their params reach the admission plugin a moment after apply."""
    deadline = time.monotonic() + timeout
    while True:
        result = dry_run(cp, namespace, document)
        if result.returncode != 0 or time.monotonic() > deadline:
            assert result.returncode != 0, f"{document['metadata']['name']} was accepted"
            return re.sub(r"\s+", " ", result.stderr)
        time.sleep(1)


CASES = {
    "workers": (
        {"resources": {"workers": 12}},
        "spec.resources.workers: 12 is more than the runtime's policy.maxWorkers 8",
    ),
    "gpus": (
        {"resources": {"workers": 8, "gpusPerWorker": 4}},
        "spec.resources.gpusPerWorker: 8 workers × 4 GPUs = 32 is more than the runtime's policy.maxGpusPerStage 16",
    ),
    "locked": (
        {"resources": {"nodeSelector": {"pool": "cheap"}}},
        "spec.resources.nodeSelector: locked by runtime team-a",
    ),
    "locked-storage": ({"storage": {"uri": "s3://mine/x"}}, "spec.storage: locked by runtime team-a"),
    "deadline": (
        {"activeDeadlineSeconds": 100000},
        "spec.activeDeadlineSeconds: 100000 is more than the runtime's policy.maxActiveDeadlineSeconds 86400",
    ),
    "image": (
        {"resources": {"image": "docker.io/evil/trainer:1"}},
        "spec.resources.image: docker.io/evil/trainer:1 does not start with one of the runtime's "
        "policy.allowedImagePrefixes (registry.acme.dev/ml/)",
    ),
    "model": (
        {"model": {"source": "hf://other/model"}},
        "spec.model.source: hf://other/model does not start with one of the runtime's policy.allowedModelPrefixes",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_violating_job_is_refused_at_create_naming_the_field(
    control_plane: ControlPlane, namespace: str, policies: None, case: str
):
    fields, message = CASES[case]
    document = job(f"bad-{case}", "team-a", **fields)
    assert message in refused(control_plane, namespace, document)
    # The operator's check names the same field.
    problems = [
        str(p) for p in effective_spec(document["spec"], runtime("ClusterFineTuneRuntime", "team-a", POLICY))[1]
    ]
    assert any(p.startswith(message.split(":")[0] + ":") for p in problems), problems


def test_stage_level_rules(control_plane: ControlPlane, namespace: str, policies: None):
    document = job("bad-stage", "team-a")
    document["spec"]["stages"][1]["resources"] = {"workers": 9}
    assert "spec.stages[].resources.workers: a stage asks for more than the runtime's policy.maxWorkers 8" in refused(
        control_plane, namespace, document
    )
    document["spec"]["stages"][1]["resources"] = {"nodeSelector": {"pool": "cheap"}}
    assert "spec.stages[].resources.nodeSelector: locked by runtime team-a" in refused(
        control_plane, namespace, document
    )
    types = job("bad-type", "team-a")
    types["spec"]["stages"].append(
        {"name": "rm", "type": "reward", "dataset": {"uri": "s3://data/prefs.jsonl"}},
    )
    assert "spec.stages[].type: reward not in the runtime's policy.allowedStageTypes (cpt, sft, dpo)" in refused(
        control_plane, namespace, types
    )


def test_a_keeping_job_and_jobs_of_other_runtimes_are_accepted(
    control_plane: ControlPlane, namespace: str, policies: None
):
    refused(control_plane, namespace, job("probe", "team-a", resources={"workers": 12}))  # the policy is active
    ok = job("ok", "team-a", resources={"workers": 8}, training={"maxSteps": 10})
    assert dry_run(control_plane, namespace, ok).returncode == 0
    other = job("other", "anything-goes", resources={"workers": 64, "nodeSelector": {"pool": "x"}})
    assert dry_run(control_plane, namespace, other).returncode == 0
    # A runtime that does not exist (yet) is not the API server's to judge: the operator waits for it.
    assert dry_run(control_plane, namespace, job("later", "not-yet", resources={"workers": 64})).returncode == 0


def test_a_namespaced_runtime_applies_in_its_namespace_only(
    control_plane: ControlPlane, namespace: str, policies: None
):
    policy = copy.deepcopy(POLICY)
    policy["maxWorkers"] = 2
    apply(control_plane, runtime("FineTuneRuntime", "small", policy, namespace))
    document = job("too-big", "small", kind="FineTuneRuntime", resources={"workers": 3})
    assert "spec.resources.workers: 3 is more than the runtime's policy.maxWorkers 2" in refused(
        control_plane, namespace, document
    )
    elsewhere = f"{namespace}-b"
    control_plane.create_namespace(elsewhere)
    assert dry_run(control_plane, elsewhere, document).returncode == 0


def test_runtimes_are_stored_as_written_and_listed_in_the_category(control_plane: ControlPlane, policies: None):
    stored = json.loads(control_plane.kubectl("get", "cftr", "team-a", "-o", "json").stdout)
    assert stored["spec"] == {"defaults": DEFAULTS, "policy": POLICY}
    listed = control_plane.kubectl("get", "finetune", "-A").stdout
    assert "team-a" in listed
    bad = runtime("ClusterFineTuneRuntime", "bad", {"lockedFields": ["stages"]})
    result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0 and "spec.policy.lockedFields[0]" in result.stderr
