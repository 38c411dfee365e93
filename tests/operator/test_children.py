"""Child manifests of a FineTuneJob: golden fields of the RayJob, the report channel and the trainer's RBAC."""

from __future__ import annotations

import json
import shlex
from datetime import UTC, datetime

import pytest

from finetune_api.render import StageConfig, render_stage
from finetune_api.spec import FineTuneJobSpec
from finetune_operator import children
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit

SETTINGS = Settings(trainer_image="registry.example/trainer:1.2", rayjob_ttl_seconds=120)


@pytest.fixture
def make_rayjob(job, sample_spec):
    def make(stage: str = "reward", attempt: int = 2, **spec_changes):
        spec = FineTuneJobSpec.model_validate(sample_spec(**spec_changes))
        config = render_stage(job.name, spec, stage, namespace=job.namespace, attempt=attempt)
        return children.rayjob(job, spec, config, SETTINGS), config

    return make


def _entrypoint_config(rayjob) -> tuple[list[str], StageConfig]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    return argv, StageConfig.model_validate_json(argv[argv.index("--config-json") + 1])


def test_rayjob_identity_owner_and_labels(make_rayjob):
    rayjob, _ = make_rayjob()
    meta = rayjob["metadata"]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (meta["name"], meta["namespace"]) == ("demo-reward-2", "ml")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "demo",
            "uid": "uid-1234",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"] == {
        "finetune.dev/job": "demo",
        "finetune.dev/stage": "reward",
        "finetune.dev/attempt": "2",
        "app.kubernetes.io/managed-by": "finetune-operator",
        "kueue.x-k8s.io/queue-name": "team-a",
        "kueue.x-k8s.io/priority-class": "high",
    }
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["suspend"] is False
    assert rayjob["spec"]["ttlSecondsAfterFinished"] == 120


def test_entrypoint_runs_the_stage_with_the_previous_stage_output_as_input(make_rayjob):
    rayjob, config = make_rayjob()
    argv, embedded = _entrypoint_config(rayjob)
    assert argv[:3] == ["python", "-m", "finetune_trainer.stage"]
    assert argv[argv.index("--report") + 1] == "configmap://ml/demo-reward-report"
    assert "--no-ray" not in argv
    assert embedded == config
    assert embedded.input_model == "s3://runs/demo/sft/model"
    assert (embedded.attempt, embedded.stage.name, embedded.namespace) == (2, "reward", "ml")


def test_entrypoint_survives_quotes_in_the_config(make_rayjob, sample_spec):
    spec = sample_spec()
    spec["model"]["chatTemplate"] = "{{ 'it''s' }} \"quoted\" $HOME `tick`"
    rayjob, config = make_rayjob(stage="sft", attempt=1, model=spec["model"])
    assert _entrypoint_config(rayjob)[1].model.chat_template == config.model.chat_template


def test_worker_pods_get_gpus_placement_secrets_and_volumes(make_rayjob):
    rayjob, _ = make_rayjob(stage="sft", attempt=1)
    cluster = rayjob["spec"]["rayClusterSpec"]
    [group] = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "registry.example/trainer:1.2"
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Job-wide secrets plus this stage's dataset secret (sft has none), each once.
    assert container["envFrom"] == [{"secretRef": {"name": n}} for n in ("model-creds", "s3-creds", "wandb")]
    assert pod["volumes"] == [{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "data"}}]
    assert container["volumeMounts"] == [{"name": "pvc-0", "mountPath": "/mnt/pvc/data"}]
    assert pod["serviceAccountName"] == "demo-trainer"
    # A GPU worker keeps DeepSpeed's own accelerator detection.
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} not in container["env"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}


def test_stage_secrets_and_resource_overrides(make_rayjob, sample_spec):
    spec = sample_spec()
    spec["stages"][1]["resources"] = {"workers": 1, "gpusPerWorker": 0, "image": "custom:2"}
    rayjob, _ = make_rayjob(stage="reward", attempt=1, stages=spec["stages"])
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["image"] == "custom:2"
    assert container["resources"]["limits"] == {"cpu": "1"}
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container["env"]
    assert {"secretRef": {"name": "data-creds"}} in container["envFrom"]
    assert "nodeSelector" not in group["template"]["spec"]


def test_pods_run_as_non_root_without_privileges(make_rayjob):
    rayjob, _ = make_rayjob()
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }


def test_trainer_role_allows_only_get_and_patch_of_the_jobs_report_configmaps(job, sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    account, role, binding = children.trainer_rbac(job, spec)
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "demo-trainer")
    assert role["kind"] == "Role"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "patch"],
            "resourceNames": ["demo-dpo-report", "demo-reward-report", "demo-sft-report"],
        }
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "ml"}]
    for manifest in (account, role, binding):
        assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
        assert manifest["metadata"]["labels"]["finetune.dev/job"] == "demo"


def test_report_configmap_is_empty_and_owned(job):
    configmap = children.report_configmap(job, "sft")
    assert configmap["metadata"]["name"] == "demo-sft-report"
    assert configmap["metadata"]["labels"]["finetune.dev/stage"] == "sft"
    assert configmap["data"] == {}


def test_referenced_secrets_name_their_fields(sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    assert children.referenced_secrets(spec) == [
        ("spec.model.credentialsSecret", "model-creds"),
        ("spec.storage.credentialsSecret", "s3-creds"),
        ("spec.stages[1].dataset.credentialsSecret", "data-creds"),
        ("spec.envFromSecrets[0]", "wandb"),
    ]
    assert ("spec.stages[1].dataset.credentialsSecret", "data-creds") not in children.referenced_secrets(
        spec, stage_index=0
    )


def test_local_command_adds_no_ray(job, sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    config = render_stage(job.name, spec, "sft", namespace=job.namespace)
    argv = children.stage_command(config, python="/venv/bin/python", no_ray=True)
    assert argv[0] == "/venv/bin/python" and argv[-1] == "--no-ray"
    assert json.loads(argv[argv.index("--config-json") + 1])["jobName"] == "demo"


def test_event_refers_to_the_job(job):
    event = children.event(
        job,
        "Warning",
        "SecretNotFound",
        "spec.model.credentialsSecret: Secret 'x' not found",
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert event["involvedObject"] == {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "demo",
        "namespace": "ml",
        "uid": "uid-1234",
    }
    assert (event["type"], event["reason"], event["firstTimestamp"]) == (
        "Warning",
        "SecretNotFound",
        "2026-01-02T03:04:05Z",
    )
    assert event["metadata"]["generateName"] == "demo."
