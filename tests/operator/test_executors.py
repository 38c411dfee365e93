"""Executors: KubeRay status meaning, and the local executor's process lifecycle (start, adopt, suspend, exit, cleanup)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import kubernetes
import pytest

from finetune_api.pipeline import ChildState
from finetune_api.reasons import Reason
from finetune_api.render import StageConfig as RenderedConfig
from finetune_api.render import rayjob_name, render_stage, stage_config_json
from finetune_api.spec import FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus, StageStatus
from finetune_dev.testing import live_group_members
from finetune_operator.children import STAGE_CONFIG_KEY
from finetune_operator.executors import (
    KubeRayExecutor,
    LocalExecutor,
    delete_artifacts,
    pod_problems,
    rayjob_observation,
)
from finetune_operator.kube import Kube
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit


def _rayjob(status: dict | None = None, suspend: bool = False) -> dict:
    return {"spec": {"suspend": suspend}, "status": status or {}}


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({}, ChildState.starting),
        ({"jobDeploymentStatus": "Initializing"}, ChildState.initializing),
        ({"jobDeploymentStatus": "Waiting"}, ChildState.initializing),
        ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, ChildState.running),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, ChildState.running),
        # KubeRay may report the Ray job's success before the deployment status catches up.
        ({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}, ChildState.succeeded),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, ChildState.succeeded),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, ChildState.failed),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}, ChildState.failed),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, ChildState.failed),
        ({"jobDeploymentStatus": "Suspended"}, ChildState.suspended),
        ({"jobDeploymentStatus": "Suspending"}, ChildState.suspended),
    ],
)
def test_rayjob_status_meaning(status, state):
    assert rayjob_observation(_rayjob(status)).state == state


def test_absent_suspended_and_failure_details():
    assert rayjob_observation(None).state == ChildState.absent
    assert rayjob_observation(_rayjob({"jobDeploymentStatus": "Running"}, suspend=True)).state == ChildState.suspended
    initializing = rayjob_observation(
        _rayjob(
            {
                "jobDeploymentStatus": "Initializing",
                "reason": "ImagePullBackOff",
                "message": "image trainer:9 not found",
            }
        )
    )
    assert initializing.message == "ImagePullBackOff image trainer:9 not found"
    failed = rayjob_observation(
        _rayjob(
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "endTime": "2026-03-01T12:00:00Z",
            }
        )
    )
    assert not failed.permanent and "AppFailed" in failed.message and failed.finished_at.minute == 0
    invalid = rayjob_observation(_rayjob({"jobDeploymentStatus": "ValidationFailed", "message": "bad spec"}))
    assert (invalid.state, invalid.permanent, invalid.reason) == (
        ChildState.failed,
        True,
        Reason.RAYJOB_VALIDATION_FAILED,
    )


class FakeKube:
    """What the local executor needs of the API: idempotent creates and a ServiceAccount token."""

    def __init__(self):
        self.created: list[str] = []
        self.tokens = 0

    def create_if_absent(self, manifest):
        self.created.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        return True

    def service_account_token(self, namespace, name, seconds):
        self.tokens += 1
        return f"token-for-{namespace}-{name}"

    def kubeconfig_for_token(self, token, path, namespace):
        path.write_text(json.dumps({"token": token}))
        return path

    def list(self, kind, namespace, selector):
        return []

    def delete(self, kind, namespace, name):
        return False


# Stands in for `python -m finetune_trainer.stage ...`: records its environment, then sleeps or exits as told.
FAKE_TRAINER = """#!/bin/sh
echo "KUBECONFIG=$KUBECONFIG"
echo "args: $*"
if [ -n "$FAKE_EXIT" ]; then exit "$FAKE_EXIT"; fi
exec sleep 60
"""


@pytest.fixture
def local(tmp_path, monkeypatch, job, sample_spec):
    trainer = tmp_path / "fake-python"
    trainer.write_text(FAKE_TRAINER)
    trainer.chmod(0o755)
    settings = Settings(executor="local", state_dir=tmp_path / "state", trainer_python=str(trainer))
    executors = []

    def make():
        executor = LocalExecutor(FakeKube(), settings)
        executors.append(executor)
        return executor

    spec = FineTuneJobSpec.model_validate(sample_spec())
    config = render_stage(job.name, spec, "sft", namespace=job.namespace, attempt=1)
    yield make, spec, config
    for executor in executors:
        executor.cleanup(job)


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_local_attempt_runs_with_the_trainer_token_and_is_adopted_after_a_restart(local, job):
    make, spec, config = local
    executor = make()
    executor.start(job, spec, config)
    assert executor.observe(job, "sft", 1).state == ChildState.running
    assert executor.kube.created == [
        "ServiceAccount/demo-trainer",
        "ConfigMap/demo.sft.stage",
        "Role/demo-trainer",
        "RoleBinding/demo-trainer",
    ]
    directory = executor.attempt_dir(job, "sft", 1)
    _wait_for(lambda: "args:" in (directory / "stage.log").read_text())
    log = (directory / "stage.log").read_text()
    assert f"KUBECONFIG={directory / 'kubeconfig'}" in log
    config_file = directory / "config.json"
    assert f"--config-file {config_file} --report configmap://ml/demo.sft.stage --no-ray" in log
    assert RenderedConfig.model_validate_json(config_file.read_text()) == config
    pid = int((directory / "pid").read_text())

    restarted = make()
    assert restarted.observe(job, "sft", 1).state == ChildState.running
    restarted.start(job, spec, config)
    assert int((directory / "pid").read_text()) == pid and restarted.kube.tokens == 0


def test_local_suspend_kills_the_process_group_and_resume_starts_it_again(local, job):
    make, spec, config = local
    executor = make()
    executor.start(job, spec, config)
    pid = int((executor.attempt_dir(job, "sft", 1) / "pid").read_text())
    executor.stop(job, "sft", 1, suspend=True)
    assert executor.observe(job, "sft", 1).state == ChildState.suspended
    assert live_group_members(pid) == []
    executor.start(job, spec, config)
    assert executor.observe(job, "sft", 1).state == ChildState.running


@pytest.mark.parametrize(
    ("code", "state", "permanent"),
    [("0", ChildState.succeeded, False), ("3", ChildState.failed, True), ("1", ChildState.failed, False)],
)
def test_local_exit_codes(local, job, monkeypatch, code, state, permanent):
    make, spec, config = local
    monkeypatch.setenv("FAKE_EXIT", code)
    executor = make()
    executor.start(job, spec, config)
    _wait_for(lambda: executor.observe(job, "sft", 1).state not in (ChildState.running, ChildState.absent))
    observed = executor.observe(job, "sft", 1)
    assert (observed.state, observed.permanent) == (state, permanent)
    assert observed.finished_at is not None
    if code != "0":
        assert f"exited with code {code}" in observed.message


def test_local_cleanup_kills_running_stages_and_removes_their_state(local, job):
    make, spec, config = local
    executor = make()
    executor.start(job, spec, config)
    pid = int((executor.attempt_dir(job, "sft", 1) / "pid").read_text())
    assert live_group_members(pid) != []
    executor.cleanup(job)
    assert live_group_members(pid) == []
    assert not executor.attempt_dir(job, "sft", 1).exists()


def test_trainer_kubeconfig_is_private_and_carries_the_ca_inline(tmp_path):
    configuration = kubernetes.client.Configuration()
    configuration.host = "https://127.0.0.1:6443"
    configuration.ssl_ca_cert = str(tmp_path / "ca.crt")
    (tmp_path / "ca.crt").write_bytes(b"CA PEM")
    path = Kube(configuration).kubeconfig_for_token("secret-token", tmp_path / "attempt" / "kubeconfig", "ml")
    assert path.stat().st_mode & 0o777 == 0o600
    config = json.loads(path.read_text())
    assert config["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:6443",
        "certificate-authority-data": base64.b64encode(b"CA PEM").decode(),
    }
    assert config["users"][0]["user"] == {"token": "secret-token"}
    assert config["contexts"][0]["context"]["namespace"] == "ml"


def test_delete_artifacts_removes_only_what_started_stages_wrote(tmp_path, sample_spec):
    storage = tmp_path / "runs"
    for written in ("model", "checkpoints/checkpoint-5", "tensorboard"):
        (storage / "sft" / written).mkdir(parents=True)
    (storage / "sft" / "metrics.jsonl").write_text('{"step": 1}\n')
    (storage / "sft" / "precious.txt").write_text("the user's")
    (storage / "reward" / "model").mkdir(parents=True)  # from an earlier job: this one never started the stage
    (storage / "unrelated").mkdir()
    spec = FineTuneJobSpec.model_validate(sample_spec(storage={"uri": str(storage), "retainOnDelete": False}))
    status = FineTuneJobStatus(
        stages=[
            StageStatus(name="sft", type="sft", attempts=1),
            StageStatus(name="reward", type="reward"),
            StageStatus(name="dpo", type="dpo", attempts=1),
        ]
    )
    lines = delete_artifacts(spec, tmp_path / "pvc", status)
    assert sorted(p.name for p in (storage / "sft").iterdir()) == ["precious.txt"]
    assert (storage / "reward" / "model").is_dir() and (storage / "unrelated").exists()
    assert lines == [
        f"{storage}/sft: deleted checkpoints, model, metrics.jsonl, tensorboard; other files kept",
        f"{storage}/reward: never started, nothing to delete",
        f"{storage}/dpo: not reachable from the operator, kept",
    ]
    (storage / "sft" / "precious.txt").unlink()
    (storage / "sft" / "model").mkdir()
    assert delete_artifacts(spec, tmp_path / "pvc", status)[0] == f"{storage}/sft: deleted"
    assert not (storage / "sft").exists()
    s3 = FineTuneJobSpec.model_validate(sample_spec(storage={"uri": "s3://runs/x", "retainOnDelete": False}))
    assert all("user's to delete" in line for line in delete_artifacts(s3, pvc_root=Path("/nonexistent")))


# -- KubeRay and Kueue -------------------------------------------------------------------------------------------------


def _queued_rayjob(status: dict | None = None) -> dict:
    rayjob = _rayjob(status, suspend=True)
    rayjob["metadata"] = {"labels": {"kueue.x-k8s.io/queue-name": "team-a"}}
    return rayjob


def test_a_suspended_rayjob_with_a_queue_label_is_queued_not_suspended():
    # Kueue's webhook creates it suspended (New -> Initializing -> Suspending -> Suspended in KubeRay's controller).
    for status in ({}, {"jobDeploymentStatus": "Initializing"}, {"jobDeploymentStatus": "Suspended"}):
        observed = rayjob_observation(_queued_rayjob(status))
        assert observed.state == ChildState.queued and "queue team-a" in observed.message
    assert rayjob_observation(_rayjob({"jobDeploymentStatus": "Suspended"}, suspend=True)).state == ChildState.suspended


def test_initializing_carries_kuberays_start_time():
    observed = rayjob_observation(_rayjob({"jobDeploymentStatus": "Initializing", "startTime": "2026-03-01T12:00:00Z"}))
    assert observed.since == datetime(2026, 3, 1, 12, tzinfo=UTC)


def test_pod_problems_name_each_stuck_pod_in_its_own_words():
    pods = [
        {
            "metadata": {"name": "c-head"},
            "status": {
                "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "nope"}}}]
            },
        },
        {
            "metadata": {"name": "c-worker"},
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    }
                ]
            },
        },
        {
            "metadata": {"name": "c-fine"},
            "status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]},
        },
        {"metadata": {"name": "c-mount"}, "status": {"phase": "Pending"}},
        {
            "metadata": {"name": "c-creating"},
            "status": {"containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]},
        },
    ]
    events = [
        {
            "type": "Warning",
            "reason": "FailedAttachVolume",
            "message": "Multi-Attach error for volume pvc-1: Volume is already used by pod c-head",
            "involvedObject": {"kind": "Pod", "name": "c-mount"},
            "lastTimestamp": "2026-03-01T12:00:05Z",
        },
        {
            "type": "Warning",
            "reason": "FailedMount",
            "message": "older",
            "involvedObject": {"kind": "Pod", "name": "c-mount"},
            "lastTimestamp": "2026-03-01T12:00:01Z",
        },
        {"type": "Warning", "reason": "BackOff", "involvedObject": {"kind": "Pod", "name": "c-fine"}},
    ]
    assert pod_problems(pods, events) == [
        "c-head: ImagePullBackOff: nope",
        "c-worker: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        "c-mount: FailedAttachVolume: Multi-Attach error for volume pvc-1: Volume is already used by pod c-head",
    ]


class RecordingKube:
    """Records the KubeRay executor's writes; `objects` are what the API server holds."""

    def __init__(self, objects=None, pods=()):
        self.objects = dict(objects or {})
        self.pods = list(pods)
        self.calls: list[tuple] = []

    def create_if_absent(self, manifest):
        key = (manifest["kind"], manifest["metadata"]["name"])
        self.calls.append(("create", *key))
        if key in self.objects:
            return False
        self.objects[key] = manifest
        return True

    def get(self, kind, namespace, name):
        return self.objects.get((kind[1], name))

    def patch(self, kind, namespace, name, patch, subresource=None):
        self.calls.append(("patch", kind[1], name, json.dumps(patch)))

    def delete(self, kind, namespace, name):
        self.calls.append(("delete", kind[1], name))

    def list(self, kind, namespace, selector):
        self.calls.append(("list", kind[1], selector))
        return self.pods

    def list_events(self, namespace, field_selector):
        self.calls.append(("events", field_selector))
        return []


@pytest.fixture
def kuberay(job, sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    config = render_stage(job.name, spec, "sft", namespace=job.namespace, attempt=1)
    return spec, config, rayjob_name(job.name, "sft", 1)


def test_kueue_alone_unsuspends_its_rayjobs(job, kuberay):
    spec, config, name = kuberay
    kube = RecordingKube({("RayJob", name): _queued_rayjob({"jobDeploymentStatus": "Suspended"})})
    executor = KubeRayExecutor(kube, Settings())
    executor.start(job, spec, config)
    assert not [call for call in kube.calls if call[0] == "patch"]
    # Suspending deletes it: Kueue un-suspends any admitted RayJob, so patching suspend would not hold.
    executor.stop(job, "sft", 1, suspend=True)
    assert kube.calls[-1] == ("delete", "RayJob", name)


def test_without_kueue_the_operator_suspends_and_resumes_its_rayjob(job, kuberay):
    spec, config, name = kuberay
    plain = dataclasses.replace(job, labels={})
    kube = RecordingKube({("RayJob", name): _rayjob({"jobDeploymentStatus": "Suspended"}, suspend=True)})
    executor = KubeRayExecutor(kube, Settings())
    executor.start(plain, spec, config)
    assert kube.calls[-1] == ("patch", "RayJob", name, '{"spec": {"suspend": false}}')
    executor.stop(plain, "sft", 1, suspend=True)
    assert kube.calls[-1] == ("patch", "RayJob", name, '{"spec": {"suspend": true}}')


def test_start_creates_what_the_pods_mount_then_the_rayjob_and_leaves_the_trainers_access(job, kuberay):
    spec, config, name = kuberay
    kube = RecordingKube()
    rest = KubeRayExecutor(kube, Settings()).start(job, spec, config, active_deadline_seconds=900)
    assert kube.calls == [
        ("create", "ServiceAccount", "demo-trainer"),
        ("create", "ConfigMap", "demo.sft.stage"),
        ("create", "RayJob", name),
    ]
    # The Role and RoleBinding are needed only once the trainer reports: they do not delay the RayJob.
    rest()
    assert kube.calls[3:] == [("create", "Role", "demo-trainer"), ("create", "RoleBinding", "demo-trainer")]
    assert kube.objects[("RayJob", name)]["spec"]["activeDeadlineSeconds"] == 900


def test_a_retry_replaces_the_config_in_the_stage_configmap_and_skips_the_trainers_rbac(job, sample_spec, kuberay):
    spec, first, _ = kuberay
    kube = RecordingKube()
    executor = KubeRayExecutor(kube, Settings())
    executor.start(job, spec, first)()
    kube.calls.clear()
    retry = render_stage(job.name, spec, "sft", namespace=job.namespace, attempt=2)
    assert executor.start(job, spec, retry) is None
    data = {"data": {STAGE_CONFIG_KEY: stage_config_json(retry)}}
    assert kube.calls == [
        ("create", "ConfigMap", "demo.sft.stage"),
        ("patch", "ConfigMap", "demo.sft.stage", json.dumps(data)),
        ("create", "RayJob", rayjob_name(job.name, "sft", 2)),
    ]


def test_an_initializing_attempt_reports_its_pods_problems(job, kuberay):
    _, _, name = kuberay
    rayjob = _rayjob({"jobDeploymentStatus": "Initializing", "rayClusterName": "c", "message": "waiting"})
    stuck = {
        "metadata": {"name": "c-head"},
        "status": {"containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull"}}}]},
    }
    kube = RecordingKube({("RayJob", name): rayjob}, pods=[stuck])
    observed = KubeRayExecutor(kube, Settings()).observe(job, "sft", 1)
    assert (observed.state, observed.message) == (ChildState.initializing, "c-head: ErrImagePull")
    assert ("list", "Pod", "ray.io/cluster=c") in kube.calls


def test_resuming_while_the_old_rayjob_is_still_being_deleted_waits_for_it(job, kuberay):
    spec, config, name = kuberay
    terminating = _queued_rayjob({"jobDeploymentStatus": "Running"})
    terminating["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    kube = RecordingKube({("RayJob", name): terminating})
    with pytest.raises(RuntimeError, match="still being deleted"):
        KubeRayExecutor(kube, Settings()).start(job, spec, config)


def test_delete_artifacts_never_leaves_the_claim(tmp_path, sample_spec):
    outside = tmp_path / "mnt" / "sft" / "model"  # where pvc://ckpts/../../sft would point
    outside.mkdir(parents=True)
    spec = FineTuneJobSpec.model_validate(sample_spec(storage={"uri": "pvc://ckpts/x", "retainOnDelete": False}))
    # A spec stored before the URI rules existed: the resolver still refuses the traversal.
    escaping = spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": "pvc://ckpts/../.."})})
    lines = delete_artifacts(escaping, pvc_root=tmp_path / "mnt" / "pvc")
    assert outside.is_dir() and all("kept" in line and "`..`" in line for line in lines), lines
