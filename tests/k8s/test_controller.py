"""The controller against a real kube-apiserver, with the chart's RBAC, KubeRay's RayJob CRD and no KubeRay:
the tests write RayJob status the way KubeRay does and report progress the way the trainer does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_api.reasons import Reason
from finetune_api.render import StageConfig
from finetune_api.report import StageReport
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB, Kube

RAYJOB_PHASES = {
    "running": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    "succeeded": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": "2026-01-01T00:00:00Z"},
    "failed": {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "FAILED",
        "reason": "AppFailed",
        "message": "worker OOMKilled",
    },
}
FAST = {"FINETUNE_RETRY_BASE_SECONDS": "1", "FINETUNE_SECRET_RECHECK_SECONDS": "1", "FINETUNE_RESYNC_SECONDS": "5"}


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"source": "s3://models/base"},
        "storage": {"uri": "s3://runs/" + name},
        "backoffLimit": 1,
        "stages": [
            {"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}},
            {"name": "dpo", "type": "dpo", "dataset": {"uri": "s3://data/prefs.jsonl"}},
        ],
    }
    base.update(spec)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": base}


class Harness:
    """The test's side of the cluster: admin API access, the operator process, KubeRay and trainer stand-ins."""

    def __init__(self, control_plane, namespace: str, operator: OperatorProcess):
        self.control_plane, self.namespace, self.operator = control_plane, namespace, operator
        self.admin = Kube.connect(str(control_plane.kubeconfig))

    def create(self, manifest: dict[str, Any]) -> None:
        manifest = json.loads(json.dumps(manifest))
        manifest["metadata"]["namespace"] = self.namespace
        self.admin.create(manifest)

    def job(self, name: str) -> dict[str, Any] | None:
        return self.admin.get(FINETUNEJOB, self.namespace, name)

    def status(self, name: str) -> dict[str, Any]:
        return (self.job(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def rayjob(self, name: str) -> dict[str, Any] | None:
        return self.admin.get(RAYJOB, self.namespace, name)

    def rayjobs(self, job: str) -> list[str]:
        return sorted(r["metadata"]["name"] for r in self.admin.list(RAYJOB, self.namespace, f"finetune.dev/job={job}"))

    def kuberay_sets(self, rayjob: str, phase: str) -> None:
        """Write RayJob status through its status subresource, as KubeRay's controller does."""
        self.admin.patch(RAYJOB, self.namespace, rayjob, {"status": RAYJOB_PHASES[phase]}, subresource="status")

    def trainer(self, job: str) -> Kube:
        """API access as the job's trainer ServiceAccount (TokenRequest, like a Pod's projected token)."""
        return Kube.connect(str(self.control_plane.service_account_kubeconfig(self.namespace, f"{job}-trainer")))

    def report(self, job: str, stage: str, **fields: Any) -> None:
        report = StageReport(**fields)
        self.trainer(job).patch(
            CONFIGMAP, self.namespace, f"{job}-{stage}-report", {"data": {"report.json": json.dumps(report.to_wire())}}
        )

    def events(self, job: str) -> list[dict[str, Any]]:
        items = self.admin.request(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/events",
            query=[("fieldSelector", f"involvedObject.name={job}")],
        ).get("items", [])
        return sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n--- operator log ---\n{self.operator.log_tail()}")
            time.sleep(0.2)

    def wait_for_rayjob(self, name: str) -> dict[str, Any]:
        return self.wait(lambda: self.rayjob(name), f"RayJob {name}")

    def wait_for_condition(
        self, job: str, type_: str, status: str = "True", reason: str | None = None
    ) -> dict[str, Any]:
        def check():
            condition = self.condition(job, type_)
            return (
                condition if condition.get("status") == status and reason in (None, condition.get("reason")) else None
            )

        return self.wait(check, f"condition {type_}={status} ({reason}) on {job}; status: {self.status(job)}")


def rendered_config(rayjob: dict[str, Any]) -> StageConfig:
    import shlex

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    return StageConfig.model_validate_json(argv[argv.index("--config-json") + 1])


@pytest.fixture
def harness(control_plane, namespace, tmp_path: Path):
    kubeconfig = install_chart_rbac(control_plane, f"op-{namespace}", namespace, "kuberay", [namespace])
    operator = OperatorProcess(kubeconfig, tmp_path / "operator.log", "kuberay", (namespace,), env=FAST)
    with operator:
        yield Harness(control_plane, namespace, operator)


def test_stages_chain_and_status_mirrors_the_report(harness: Harness):
    manifest = job_manifest("chain")
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    harness.create(manifest)
    rayjob = harness.wait_for_rayjob("chain-sft-1")
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "FineTuneJob",
        "chain",
        harness.job("chain")["metadata"]["uid"],
    )
    assert rendered_config(rayjob).input_model == "s3://models/base"

    harness.kuberay_sets("chain-sft-1", "running")
    harness.wait_for_condition("chain", "Running", reason=Reason.STAGE_RUNNING)
    harness.report(
        "chain",
        "sft",
        phase="Running",
        attempt=1,
        step=7,
        total_steps=20,
        loss=1.5,
        last_checkpoint="s3://runs/chain/sft/checkpoints/checkpoint-5",
    )
    stage = harness.wait(
        lambda: (s := harness.status("chain")["stages"][0]).get("progress", {}).get("step") == 7 and s,
        "progress mirrored into status",
    )
    assert stage["lastCheckpoint"] == "s3://runs/chain/sft/checkpoints/checkpoint-5"
    assert stage["progress"]["totalSteps"] == 20 and stage["metrics"]["loss"] == 1.5

    # The trainer's ServiceAccount may write only its job's report ConfigMaps.
    forbidden = harness.control_plane.kubectl(
        "get",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        harness.namespace,
        check=False,
        kubeconfig=harness.control_plane.service_account_kubeconfig(harness.namespace, "chain-trainer"),
    )
    assert forbidden.returncode != 0 and "forbidden" in forbidden.stderr

    harness.report(
        "chain",
        "sft",
        phase="Succeeded",
        attempt=1,
        step=20,
        total_steps=20,
        checkpoint="s3://runs/chain/sft/model",
        metrics={"eval_loss_before": 2.0, "eval_loss_after": 0.7},
    )
    harness.kuberay_sets("chain-sft-1", "succeeded")
    second = harness.wait_for_rayjob("chain-dpo-1")
    assert rendered_config(second).input_model == "s3://runs/chain/sft/model"

    harness.kuberay_sets("chain-dpo-1", "succeeded")
    harness.report(
        "chain",
        "dpo",
        phase="Succeeded",
        attempt=1,
        checkpoint="s3://runs/chain/dpo/model",
        metrics={"reward_margin": 0.4},
    )
    waited = harness.control_plane.kubectl(
        "wait", "--for=condition=Succeeded", "ftj/chain", "-n", harness.namespace, "--timeout=30s"
    )
    assert "condition met" in waited.stdout
    status = harness.status("chain")
    assert (status["phase"], status["progress"], status["observedGeneration"]) == ("Succeeded", "2/2", 1)
    assert [(s["name"], s["phase"], s["checkpoint"]) for s in status["stages"]] == [
        ("sft", "Succeeded", "s3://runs/chain/sft/model"),
        ("dpo", "Succeeded", "s3://runs/chain/dpo/model"),
    ]
    assert status["stages"][0]["metrics"]["eval_loss_after"] == 0.7
    reasons_seen = [e["reason"] for e in harness.events("chain")]
    for reason in (
        Reason.STAGE_STARTING,
        Reason.CHECKPOINT_SAVED,
        Reason.STAGE_SUCCEEDED,
        Reason.ALL_STAGES_SUCCEEDED,
    ):
        assert reason in reasons_seen
    assert 'finetune_operator_jobs{phase="Succeeded"} 1.0' in harness.operator.metrics()


def test_failures_retry_from_the_checkpoint_then_fail_after_backoff_limit(harness: Harness):
    harness.create(job_manifest("retry", backoffLimit=1))
    harness.wait_for_rayjob("retry-sft-1")
    harness.report(
        "retry", "sft", phase="Running", attempt=1, last_checkpoint="s3://runs/retry/sft/checkpoints/checkpoint-10"
    )
    harness.kuberay_sets("retry-sft-1", "failed")
    second = harness.wait_for_rayjob("retry-sft-2")
    assert rendered_config(second).attempt == 2
    assert any(
        e["reason"] == Reason.RETRYING_FROM_CHECKPOINT and "checkpoint-10" in e["message"]
        for e in harness.events("retry")
    )
    harness.kuberay_sets("retry-sft-2", "failed")
    condition = harness.wait_for_condition("retry", "Failed", reason=Reason.BACKOFF_LIMIT_EXCEEDED)
    assert "worker OOMKilled" in condition["message"]
    time.sleep(2)
    assert harness.rayjobs("retry") == ["retry-sft-1", "retry-sft-2"]
    assert harness.status("retry")["stages"][0]["attempts"] == 2


def test_a_permanent_trainer_failure_is_not_retried(harness: Harness):
    harness.create(job_manifest("gate"))
    harness.wait_for_rayjob("gate-sft-1")
    harness.report(
        "gate",
        "sft",
        phase="Failed",
        attempt=1,
        reason="InvalidDataset",
        message="instruct.jsonl:3: expected columns prompt, completion",
    )
    harness.kuberay_sets("gate-sft-1", "failed")
    condition = harness.wait_for_condition("gate", "Failed", reason="InvalidDataset")
    assert "instruct.jsonl:3" in condition["message"]
    time.sleep(2)
    assert harness.rayjobs("gate") == ["gate-sft-1"]


def test_suspend_and_resume(harness: Harness):
    harness.create(job_manifest("pause"))
    harness.wait_for_rayjob("pause-sft-1")
    harness.kuberay_sets("pause-sft-1", "running")
    harness.wait_for_condition("pause", "Running", reason=Reason.STAGE_RUNNING)
    harness.admin.patch(FINETUNEJOB, harness.namespace, "pause", {"spec": {"suspend": True}})
    harness.wait(lambda: harness.rayjob("pause-sft-1")["spec"].get("suspend") is True, "RayJob suspended")
    harness.wait_for_condition("pause", "Suspended", reason=Reason.SUSPENDED)
    assert harness.status("pause")["phase"] == "Suspended"
    harness.admin.patch(
        RAYJOB, harness.namespace, "pause-sft-1", {"status": {"jobDeploymentStatus": "Suspended"}}, subresource="status"
    )

    harness.admin.patch(FINETUNEJOB, harness.namespace, "pause", {"spec": {"suspend": False}})
    harness.wait(lambda: harness.rayjob("pause-sft-1")["spec"].get("suspend") is False, "RayJob resumed")
    harness.wait_for_condition("pause", "Suspended", status="False", reason=Reason.RESUMED)
    assert harness.rayjobs("pause") == ["pause-sft-1"]


def test_deletion_removes_every_child(harness: Harness):
    harness.create(job_manifest("gone"))
    harness.wait_for_rayjob("gone-sft-1")
    harness.admin.delete(FINETUNEJOB, harness.namespace, "gone")
    harness.wait(lambda: harness.job("gone") is None, "the FineTuneJob to be deleted")
    selector = "finetune.dev/job=gone"
    assert harness.admin.list(RAYJOB, harness.namespace, selector) == []
    assert harness.admin.list(CONFIGMAP, harness.namespace, selector) == []
    for kind in (
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ):
        assert harness.admin.get(kind, harness.namespace, "gone-trainer") is None


def test_ttl_deletes_the_finished_job(harness: Harness):
    spec = job_manifest("short", ttlSecondsAfterFinished=2)
    spec["spec"]["stages"] = spec["spec"]["stages"][:1]
    harness.create(spec)
    harness.wait_for_rayjob("short-sft-1")
    harness.kuberay_sets("short-sft-1", "succeeded")
    harness.wait_for_condition("short", "Succeeded")
    harness.wait(lambda: harness.job("short") is None, "TTL deletion", timeout=20)


def test_deadline_fails_the_job_and_deletes_the_running_rayjob(harness: Harness):
    harness.create(job_manifest("late", activeDeadlineSeconds=2))
    harness.wait_for_rayjob("late-sft-1")
    harness.kuberay_sets("late-sft-1", "running")
    harness.wait_for_condition("late", "Failed", reason=Reason.DEADLINE_EXCEEDED)
    harness.wait(lambda: harness.rayjob("late-sft-1") is None, "the running RayJob to be deleted")


def test_operator_restart_mid_stage_duplicates_nothing(harness: Harness):
    harness.create(job_manifest("restart"))
    harness.wait_for_rayjob("restart-sft-1")
    harness.kuberay_sets("restart-sft-1", "running")
    harness.wait_for_condition("restart", "Running", reason=Reason.STAGE_RUNNING)
    harness.operator.kill()
    harness.kuberay_sets("restart-sft-1", "succeeded")
    harness.report("restart", "sft", phase="Succeeded", attempt=1, checkpoint="s3://runs/restart/sft/model")
    harness.operator.start()
    harness.wait_for_rayjob("restart-dpo-1")
    harness.kuberay_sets("restart-dpo-1", "running")
    harness.operator.kill()
    harness.operator.start()
    harness.wait_for_condition("restart", "Running", reason=Reason.STAGE_RUNNING)
    time.sleep(2)
    assert harness.rayjobs("restart") == ["restart-dpo-1", "restart-sft-1"]
    assert [s["attempts"] for s in harness.status("restart")["stages"]] == [1, 1]


def test_a_missing_secret_is_named_and_waited_for(harness: Harness):
    harness.create(job_manifest("creds", model={"source": "s3://models/base", "credentialsSecret": "model-creds"}))
    condition = harness.wait_for_condition("creds", "Running", status="False", reason=Reason.SECRET_NOT_FOUND)
    assert "spec.model.credentialsSecret" in condition["message"] and "'model-creds'" in condition["message"]
    assert harness.rayjobs("creds") == []
    harness.admin.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "model-creds", "namespace": harness.namespace},
            "stringData": {"AWS_SECRET_ACCESS_KEY": "do-not-leak-this"},
        }
    )
    rayjob = harness.wait_for_rayjob("creds-sft-1")
    assert {"secretRef": {"name": "model-creds"}} in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][
        "template"
    ]["spec"]["containers"][0]["envFrom"]
    everything = json.dumps([harness.job("creds"), harness.events("creds")]) + harness.operator.log_tail(10000)
    assert "do-not-leak-this" not in everything


def test_a_missing_secret_of_the_next_stage_is_caught_when_the_stage_before_it_ends(harness: Harness):
    stages = job_manifest("later")["spec"]["stages"]
    stages[1]["dataset"]["credentialsSecret"] = "prefs-creds"
    harness.create(job_manifest("later", stages=stages))
    harness.wait_for_rayjob("later-sft-1")
    harness.kuberay_sets("later-sft-1", "running")
    harness.wait_for_condition("later", "Running", reason=Reason.STAGE_RUNNING)
    harness.report("later", "sft", phase="Succeeded", attempt=1, checkpoint="s3://runs/later/sft/model")
    harness.kuberay_sets("later-sft-1", "succeeded")
    condition = harness.wait_for_condition("later", "Running", status="False", reason=Reason.SECRET_NOT_FOUND)
    assert "spec.stages[1].dataset.credentialsSecret: Secret 'prefs-creds' not found" in condition["message"]
    assert harness.rayjobs("later") == ["later-sft-1"]
    harness.admin.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "prefs-creds", "namespace": harness.namespace},
            "stringData": {"AWS_SECRET_ACCESS_KEY": "x"},
        }
    )
    harness.wait_for_rayjob("later-dpo-1")


def test_an_invalid_uri_is_refused_by_the_api_server_naming_the_field(harness: Harness):
    manifest = job_manifest("badsrc", model={"source": "ftp://models/base"})
    manifest["metadata"]["namespace"] = harness.namespace
    refused = harness.control_plane.kubectl("create", "-f", "-", input=json.dumps(manifest), check=False)
    assert refused.returncode != 0
    assert "spec.model.source: Invalid value" in refused.stderr and "unsupported scheme" in refused.stderr
    assert harness.job("badsrc") is None
