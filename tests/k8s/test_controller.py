"""The controller against a real kube-apiserver, with the chart's RBAC, KubeRay's RayJob CRD and no KubeRay:
the tests write RayJob status the way KubeRay does and report progress the way the trainer does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from finetune_api.reasons import Reason
from finetune_api.render import StageConfig, rayjob_name, stage_configmap_name
from finetune_api.report import StageReport
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator.children import ATTEMPT_LABEL, trainer_service_account_name
from finetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB, Kube

RAYJOB_PHASES = {
    "suspended": {"jobDeploymentStatus": "Suspended", "jobStatus": "NEW"},
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

    def kueue_admits(self, rayjob: str) -> None:
        """Clear `suspend`, as Kueue does when it admits the RayJob's workload (RunWithPodSetsInfo)."""
        self.admin.patch(RAYJOB, self.namespace, rayjob, {"spec": {"suspend": False}})

    def trainer(self, job: str) -> Kube:
        """API access as the job's trainer ServiceAccount (TokenRequest, like a Pod's projected token)."""
        return Kube.connect(
            str(self.control_plane.service_account_kubeconfig(self.namespace, trainer_service_account_name(job)))
        )

    def report(self, job: str, stage: str, **fields: Any) -> None:
        report = StageReport(**fields)
        self.trainer(job).patch(
            CONFIGMAP,
            self.namespace,
            stage_configmap_name(job, stage),
            {"data": {"report.json": json.dumps(report.to_wire())}},
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


def rj(job: str, stage: str, attempt: int) -> str:
    return rayjob_name(job, stage, attempt)


def rendered_config(harness: Harness, rayjob: dict[str, Any]) -> StageConfig:
    """The StageConfig the RayJob's pods mount: its stage's ConfigMap, which holds the latest attempt's config."""
    [volume] = [
        v for v in rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"] if "configMap" in v
    ]
    configmap = harness.admin.get(CONFIGMAP, harness.namespace, volume["configMap"]["name"])
    config = StageConfig.model_validate_json(configmap["data"]["config.json"])
    assert str(config.attempt) == rayjob["metadata"]["labels"][ATTEMPT_LABEL]
    return config


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
    rayjob = harness.wait_for_rayjob(rj("chain", "sft", 1))
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    owner = rayjob["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "FineTuneJob",
        "chain",
        harness.job("chain")["metadata"]["uid"],
    )
    assert rendered_config(harness, rayjob).input_model == "s3://models/base"
    # Queued in Kueue until admitted: the operator leaves `suspend` alone and says so.
    assert rayjob["spec"]["suspend"] is True
    harness.kuberay_sets(rj("chain", "sft", 1), "suspended")
    harness.wait_for_condition("chain", "Running", reason=Reason.QUEUED)
    assert harness.status("chain")["stages"][0]["phase"] == "Queued"
    time.sleep(1)
    assert harness.rayjob(rj("chain", "sft", 1))["spec"]["suspend"] is True

    harness.kueue_admits(rj("chain", "sft", 1))
    harness.kuberay_sets(rj("chain", "sft", 1), "running")
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

    # The trainer's ServiceAccount may write only its job's stage ConfigMaps.
    forbidden = harness.control_plane.kubectl(
        "get",
        "configmap",
        "kube-root-ca.crt",
        "-n",
        harness.namespace,
        check=False,
        kubeconfig=harness.control_plane.service_account_kubeconfig(
            harness.namespace, trainer_service_account_name("chain")
        ),
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
    harness.kuberay_sets(rj("chain", "sft", 1), "succeeded")
    second = harness.wait_for_rayjob(rj("chain", "dpo", 1))
    assert rendered_config(harness, second).input_model == "s3://runs/chain/sft/model"
    harness.kueue_admits(rj("chain", "dpo", 1))

    harness.kuberay_sets(rj("chain", "dpo", 1), "succeeded")
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
    harness.wait_for_rayjob(rj("retry", "sft", 1))
    harness.report(
        "retry", "sft", phase="Running", attempt=1, last_checkpoint="s3://runs/retry/sft/checkpoints/checkpoint-10"
    )
    harness.kuberay_sets(rj("retry", "sft", 1), "failed")
    second = harness.wait_for_rayjob(rj("retry", "sft", 2))
    assert rendered_config(harness, second).attempt == 2
    assert any(
        e["reason"] == Reason.RETRYING_FROM_CHECKPOINT and "checkpoint-10" in e["message"]
        for e in harness.events("retry")
    )
    harness.kuberay_sets(rj("retry", "sft", 2), "failed")
    condition = harness.wait_for_condition("retry", "Failed", reason=Reason.BACKOFF_LIMIT_EXCEEDED)
    assert "worker OOMKilled" in condition["message"]
    time.sleep(2)
    assert harness.rayjobs("retry") == [rj("retry", "sft", 1), rj("retry", "sft", 2)]
    assert harness.status("retry")["stages"][0]["attempts"] == 2


def test_a_permanent_trainer_failure_is_not_retried(harness: Harness):
    harness.create(job_manifest("gate"))
    harness.wait_for_rayjob(rj("gate", "sft", 1))
    harness.report(
        "gate",
        "sft",
        phase="Failed",
        attempt=1,
        reason="InvalidDataset",
        message="instruct.jsonl:3: expected columns prompt, completion",
    )
    harness.kuberay_sets(rj("gate", "sft", 1), "failed")
    condition = harness.wait_for_condition("gate", "Failed", reason="InvalidDataset")
    assert "instruct.jsonl:3" in condition["message"]
    time.sleep(2)
    assert harness.rayjobs("gate") == [rj("gate", "sft", 1)]


def test_suspend_and_resume(harness: Harness):
    harness.create(job_manifest("pause"))
    harness.wait_for_rayjob(rj("pause", "sft", 1))
    harness.kuberay_sets(rj("pause", "sft", 1), "running")
    harness.wait_for_condition("pause", "Running", reason=Reason.STAGE_RUNNING)
    harness.admin.patch(FINETUNEJOB, harness.namespace, "pause", {"spec": {"suspend": True}})
    harness.wait(lambda: harness.rayjob(rj("pause", "sft", 1))["spec"].get("suspend") is True, "RayJob suspended")
    harness.wait_for_condition("pause", "Suspended", reason=Reason.SUSPENDED)
    assert harness.status("pause")["phase"] == "Suspended"
    harness.admin.patch(
        RAYJOB,
        harness.namespace,
        rj("pause", "sft", 1),
        {"status": {"jobDeploymentStatus": "Suspended"}},
        subresource="status",
    )

    harness.admin.patch(FINETUNEJOB, harness.namespace, "pause", {"spec": {"suspend": False}})
    harness.wait(lambda: harness.rayjob(rj("pause", "sft", 1))["spec"].get("suspend") is False, "RayJob resumed")
    harness.wait_for_condition("pause", "Suspended", status="False", reason=Reason.RESUMED)
    assert harness.rayjobs("pause") == [rj("pause", "sft", 1)]


def test_a_job_that_keeps_its_artifacts_carries_no_finalizer(harness: Harness):
    """Its deletion needs no operator: owner references let the garbage collector remove the children (tested with
    kube-controller-manager in test_neighbours)."""
    harness.create(job_manifest("kept"))
    harness.wait_for_rayjob(rj("kept", "sft", 1))
    harness.wait(lambda: harness.status("kept").get("stages"), "the status of the started stage")
    metadata = harness.job("kept")["metadata"]
    assert not metadata.get("finalizers") and not metadata.get("annotations")


def test_deleting_a_job_that_drops_its_artifacts_removes_every_child_first(harness: Harness):
    """retainOnDelete: false needs the operator at deletion, so the job holds its finalizer: the operator deletes
    the children itself, then lets the job go (no garbage collector runs here)."""
    harness.create(job_manifest("gone", storage={"uri": "s3://runs/gone", "retainOnDelete": False}))
    harness.wait_for_rayjob(rj("gone", "sft", 1))
    assert harness.job("gone")["metadata"]["finalizers"] == ["finetune.dev/cleanup"]
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
    harness.wait_for_rayjob(rj("short", "sft", 1))
    harness.kuberay_sets(rj("short", "sft", 1), "succeeded")
    harness.wait_for_condition("short", "Succeeded")
    harness.wait(lambda: harness.job("short") is None, "TTL deletion", timeout=20)


def test_deadline_fails_the_job_and_deletes_the_running_rayjob(harness: Harness):
    harness.create(job_manifest("late", activeDeadlineSeconds=2))
    harness.wait_for_rayjob(rj("late", "sft", 1))
    harness.kuberay_sets(rj("late", "sft", 1), "running")
    harness.wait_for_condition("late", "Failed", reason=Reason.DEADLINE_EXCEEDED)
    harness.wait(lambda: harness.rayjob(rj("late", "sft", 1)) is None, "the running RayJob to be deleted")


def test_operator_restart_mid_stage_duplicates_nothing(harness: Harness):
    harness.create(job_manifest("restart"))
    harness.wait_for_rayjob(rj("restart", "sft", 1))
    harness.kuberay_sets(rj("restart", "sft", 1), "running")
    harness.wait_for_condition("restart", "Running", reason=Reason.STAGE_RUNNING)
    harness.operator.kill()
    harness.kuberay_sets(rj("restart", "sft", 1), "succeeded")
    harness.report("restart", "sft", phase="Succeeded", attempt=1, checkpoint="s3://runs/restart/sft/model")
    harness.operator.start()
    harness.wait_for_rayjob(rj("restart", "dpo", 1))
    harness.kuberay_sets(rj("restart", "dpo", 1), "running")
    harness.operator.kill()
    harness.operator.start()
    harness.wait_for_condition("restart", "Running", reason=Reason.STAGE_RUNNING)
    time.sleep(2)
    assert harness.rayjobs("restart") == [rj("restart", "dpo", 1), rj("restart", "sft", 1)]
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
    rayjob = harness.wait_for_rayjob(rj("creds", "sft", 1))
    assert {"secretRef": {"name": "model-creds"}} in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][
        "template"
    ]["spec"]["containers"][0]["envFrom"]
    everything = json.dumps([harness.job("creds"), harness.events("creds")]) + harness.operator.log_tail(10000)
    assert "do-not-leak-this" not in everything


def test_a_report_with_nan_written_by_an_older_trainer_does_not_freeze_the_status(harness: Harness):
    harness.create(job_manifest("nan"))
    harness.wait_for_rayjob(rj("nan", "sft", 1))
    text = '{"phase": "Running", "attempt": 1, "step": 3, "totalSteps": 9, "loss": NaN, "metrics": {"x": Infinity}}'
    harness.trainer("nan").patch(
        CONFIGMAP, harness.namespace, stage_configmap_name("nan", "sft"), {"data": {"report.json": text}}
    )
    stage = harness.wait(
        lambda: (s := harness.status("nan")["stages"][0]).get("progress", {}).get("step") == 3 and s,
        "progress of a report with NaN mirrored into status",
    )
    assert "loss" not in stage.get("metrics", {}) and "x" not in stage.get("metrics", {})


def test_a_refused_status_update_shows_as_a_warning_event_and_a_condition(harness: Harness, tmp_path: Path):
    # An admission policy stands for any reason the API server has to refuse the operator's status patch: here it
    # refuses every status that marks a stage Succeeded.
    name = f"refuse-succeeded-{harness.namespace}"
    policy = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["finetune.dev"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["finetunejobs/status"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "!has(object.status.stages) || object.status.stages.all(s, s.phase != 'Succeeded')",
                        "message": "stages may not succeed here",
                        "reason": "Invalid",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": harness.namespace}}
                },
            },
        },
    ]
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": policy}))
    harness.control_plane.kubectl("apply", "-f", str(policy_file))
    try:
        # The apiserver loads a new policy some seconds later: only go on once it refuses a probe job's status.
        harness.create(job_manifest("probe", suspend=True))
        succeeded = {"stages": [{"name": "sft", "type": "sft", "phase": "Succeeded"}]}

        def policy_refuses() -> bool:
            try:
                harness.admin.patch_job_status(harness.namespace, "probe", succeeded)
            except ApiException as exc:
                return exc.status == 422
            return False

        harness.wait(policy_refuses, "the admission policy to take effect", timeout=60)
        harness.create(job_manifest("refused"))
        harness.wait_for_rayjob(rj("refused", "sft", 1))
        harness.report("refused", "sft", phase="Succeeded", attempt=1, checkpoint="s3://runs/refused/sft/model")
        harness.kuberay_sets(rj("refused", "sft", 1), "succeeded")
        condition = harness.wait(
            lambda: (
                harness.condition("refused", "StatusUpdated").get("reason") == Reason.STATUS_PATCH_REFUSED
                and harness.condition("refused", "StatusUpdated")
            ),
            "a StatusUpdated=False condition",
            timeout=60,  # the policy takes effect some seconds after it is created
        )
        assert condition["status"] == "False"
        assert "stages may not succeed here" in condition["message"]
        warnings = harness.wait(
            lambda: [e for e in harness.events("refused") if e["reason"] == Reason.STATUS_PATCH_REFUSED],
            "a StatusPatchRefused Event",
        )
        assert warnings[0]["type"] == "Warning" and "stages may not succeed here" in warnings[0]["message"]
        time.sleep(3)  # further refused passes post no further Events
        assert len([e for e in harness.events("refused") if e["reason"] == Reason.STATUS_PATCH_REFUSED]) == 1
    finally:
        harness.control_plane.kubectl("delete", "-f", str(policy_file), check=False)
    harness.wait(
        lambda: harness.status("refused")["stages"][0].get("phase") == "Succeeded", "sft Succeeded", timeout=60
    )
    assert harness.condition("refused", "StatusUpdated") == {}
    # Every refused pass decided "sft succeeded, dpo starts" again, and posted its Events before the refused write
    # (as a pass killed before its status write would): each appears once.
    reasons = [e["reason"] for e in harness.events("refused")]
    assert reasons.count(Reason.STAGE_SUCCEEDED) == 1 and reasons.count(Reason.STAGE_STARTING) == 2, reasons


def test_a_rayjob_refused_by_admission_fails_the_attempt_in_status_and_an_event(harness: Harness):
    # A real admission refusal (as Pod Security, a webhook or a quota would give): a ValidatingAdmissionPolicy.
    policy = f"no-rayjobs-{harness.namespace}"
    harness.control_plane.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "admissionregistration.k8s.io/v1",
                        "kind": "ValidatingAdmissionPolicy",
                        "metadata": {"name": policy},
                        "spec": {
                            "failurePolicy": "Fail",
                            "matchConstraints": {
                                "resourceRules": [
                                    {
                                        "apiGroups": ["ray.io"],
                                        "apiVersions": ["v1"],
                                        "operations": ["CREATE"],
                                        "resources": ["rayjobs"],
                                    }
                                ]
                            },
                            "validations": [
                                {"expression": "false", "message": "RayJobs need an approved team label here"}
                            ],
                        },
                    },
                    {
                        "apiVersion": "admissionregistration.k8s.io/v1",
                        "kind": "ValidatingAdmissionPolicyBinding",
                        "metadata": {"name": policy},
                        "spec": {
                            "policyName": policy,
                            "validationActions": ["Deny"],
                            "matchResources": {
                                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": harness.namespace}}
                            },
                        },
                    },
                ],
            }
        )
    )
    try:
        probe = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": "probe", "namespace": harness.namespace},
            "spec": {"entrypoint": "true"},
        }

        def policy_active() -> bool:
            try:
                harness.admin.create(probe)
            except Exception as exc:  # noqa: BLE001 - the policy's denial is what is waited for
                return "approved team label" in str(exc)
            harness.admin.delete(RAYJOB, harness.namespace, "probe")
            return False

        harness.wait(policy_active, "the admission policy to take effect")
        harness.create(job_manifest("refused", backoffLimit=0))
        condition = harness.wait_for_condition("refused", "Failed", reason=Reason.BACKOFF_LIMIT_EXCEEDED)
        assert "refused" in condition["message"] and "approved team label" in condition["message"]
        assert any(
            e["reason"] == Reason.CHILD_REFUSED and "approved team label" in e["message"]
            for e in harness.events("refused")
        )
        assert harness.rayjobs("refused") == []
    finally:
        harness.control_plane.kubectl(
            "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy, check=False
        )


def test_a_readwriteonce_claim_shared_by_the_ray_pods_is_announced(harness: Harness):
    harness.admin.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": harness.namespace},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
    )
    manifest = job_manifest("rwo")
    manifest["spec"]["stages"][0]["dataset"] = {"uri": "pvc://data/instruct.jsonl"}
    harness.create(manifest)
    harness.wait_for_rayjob(rj("rwo", "sft", 1))
    event = harness.wait(
        lambda: next((e for e in harness.events("rwo") if e["reason"] == Reason.STORAGE_NOT_SHARED), None),
        "the StorageNotShared event",
    )
    assert event["type"] == "Warning" and "ReadWriteOnce" in event["message"] and "ReadWriteMany" in event["message"]


def test_a_missing_secret_of_the_next_stage_is_caught_when_the_stage_before_it_ends(harness: Harness):
    stages = job_manifest("later")["spec"]["stages"]
    stages[1]["dataset"]["credentialsSecret"] = "prefs-creds"
    harness.create(job_manifest("later", stages=stages))
    harness.wait_for_rayjob(rj("later", "sft", 1))
    harness.kuberay_sets(rj("later", "sft", 1), "running")
    harness.wait_for_condition("later", "Running", reason=Reason.STAGE_RUNNING)
    harness.report("later", "sft", phase="Succeeded", attempt=1, checkpoint="s3://runs/later/sft/model")
    harness.kuberay_sets(rj("later", "sft", 1), "succeeded")
    condition = harness.wait_for_condition("later", "Running", status="False", reason=Reason.SECRET_NOT_FOUND)
    assert "spec.stages[1].dataset.credentialsSecret: Secret 'prefs-creds' not found" in condition["message"]
    assert harness.rayjobs("later") == [rj("later", "sft", 1)]
    harness.admin.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "prefs-creds", "namespace": harness.namespace},
            "stringData": {"AWS_SECRET_ACCESS_KEY": "x"},
        }
    )
    harness.wait_for_rayjob(rj("later", "dpo", 1))


def test_an_invalid_uri_is_refused_by_the_api_server_naming_the_field(harness: Harness):
    manifest = job_manifest("badsrc", model={"source": "ftp://models/base"})
    manifest["metadata"]["namespace"] = harness.namespace
    refused = harness.control_plane.kubectl("create", "-f", "-", input=json.dumps(manifest), check=False)
    assert refused.returncode != 0
    assert "spec.model.source: Invalid value" in refused.stderr and "unsupported scheme" in refused.stderr
    assert harness.job("badsrc") is None
