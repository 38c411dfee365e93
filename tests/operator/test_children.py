"""Child manifests of a FineTuneJob: golden fields of the RayJob, the report channel and the trainer's RBAC."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from finetune_api.render import (
    StageConfig,
    rayjob_name,
    render_stage,
    stage_config_json,
    stage_configmap_name,
)
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


def _entrypoint_config(rayjob, job, config) -> tuple[list[str], StageConfig]:
    """The entrypoint's argv and the StageConfig it reads: the stage's ConfigMap, at the path the pods mount it."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    configmap = children.stage_configmap(job, config)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    [volume] = [v for v in head["volumes"] if v.get("configMap")]
    [mount] = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    [item] = volume["configMap"]["items"]
    assert argv[argv.index("--config-file") + 1] == f"{mount['mountPath']}/{item['path']}"
    return argv, StageConfig.model_validate_json(configmap["data"][item["key"]])


def test_rayjob_identity_owner_and_labels(make_rayjob):
    rayjob, _ = make_rayjob()
    meta = rayjob["metadata"]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert (meta["name"], meta["namespace"]) == ("demo-reward-2-244d2762", "ml")
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
    # The job has a queue label: created suspended, for Kueue to admit, as Kueue's webhook would make it anyway.
    assert rayjob["spec"]["suspend"] is True
    assert rayjob["spec"]["ttlSecondsAfterFinished"] == 120
    assert rayjob["spec"]["submissionMode"] == "HTTPMode"
    assert "activeDeadlineSeconds" not in rayjob["spec"]


def test_entrypoint_runs_the_stage_with_the_previous_stage_output_as_input(make_rayjob, job):
    rayjob, config = make_rayjob()
    argv, embedded = _entrypoint_config(rayjob, job, config)
    assert argv[:3] == ["python", "-m", "finetune_trainer.stage"]
    assert argv[argv.index("--report") + 1] == "configmap://ml/demo.reward.stage"
    assert "--no-ray" not in argv
    assert embedded == config
    assert embedded.input_model == "s3://runs/demo/sft/model"
    assert (embedded.attempt, embedded.stage.name, embedded.namespace) == (2, "reward", "ml")


def test_entrypoint_survives_quotes_in_the_config(make_rayjob, sample_spec, job):
    spec = sample_spec()
    spec["model"]["chatTemplate"] = "{{ 'it''s' }} \"quoted\" $HOME `tick`"
    rayjob, config = make_rayjob(stage="sft", attempt=1, model=spec["model"])
    assert _entrypoint_config(rayjob, job, config)[1].model.chat_template == config.model.chat_template


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
    assert pod["volumes"] == [
        {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "data"}},
        {
            "name": "stage-config",
            "configMap": {"name": "demo.sft.stage", "items": [{"key": "config.json", "path": "config.json"}]},
        },
        {"name": "scratch", "emptyDir": {}},
    ]
    assert container["volumeMounts"] == [
        {"name": "pvc-0", "mountPath": "/mnt/pvc/data"},
        {"name": "stage-config", "mountPath": "/etc/finetune/stage", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    assert {"name": "FINETUNE_WORK_DIR", "value": "/scratch"} in container["env"]
    assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
    # A large model PVC is re-owned only when its root is not the trainer's already.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["serviceAccountName"] == "demo-trainer" and pod["automountServiceAccountToken"] is True
    assert "imagePullSecrets" not in pod
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


def test_trainer_role_allows_only_get_and_patch_of_the_jobs_stage_configmaps(job, sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    account = children.trainer_service_account(job)
    role, binding = children.trainer_report_access(job, spec)
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "demo-trainer")
    assert role["kind"] == "Role"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "patch"],
            "resourceNames": ["demo.dpo.stage", "demo.reward.stage", "demo.sft.stage"],
        }
    ]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "ml"}]
    for manifest in (account, role, binding):
        assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
        assert manifest["metadata"]["labels"]["finetune.dev/job"] == "demo"


def test_stage_configmap_carries_only_the_attempts_config_and_is_owned(job, sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    config = render_stage(job.name, spec, "sft", namespace=job.namespace, attempt=3)
    configmap = children.stage_configmap(job, config)
    assert configmap["metadata"]["name"] == "demo.sft.stage"
    assert configmap["metadata"]["labels"] == {
        "finetune.dev/job": "demo",
        "app.kubernetes.io/managed-by": "finetune-operator",
        "finetune.dev/stage": "sft",
    }
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    # The trainer adds `report.json`; a retry replaces `config.json` only (a merge patch of this `data`).
    assert list(configmap["data"]) == [children.STAGE_CONFIG_KEY]
    assert StageConfig.model_validate_json(configmap["data"][children.STAGE_CONFIG_KEY]).attempt == 3


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
    argv = children.stage_command(config, config_path="/state/config.json", python="/venv/bin/python", no_ray=True)
    assert argv == [
        "/venv/bin/python",
        "-m",
        "finetune_trainer.stage",
        "--config-file",
        "/state/config.json",
        "--report",
        "configmap://ml/demo.sft.stage",
        "--no-ray",
    ]


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
    # The same happening twice (decided again after a crash) has one name; another message or generation, another.
    again = children.event(job, "Warning", "SecretNotFound", event["message"], datetime(2026, 1, 2, tzinfo=UTC))
    other = children.event(job, "Warning", "SecretNotFound", "Secret 'y' not found", datetime(2026, 1, 2, tzinfo=UTC))
    later = children.event(
        dataclasses.replace(job, generation=job.generation + 1),
        "Warning",
        "SecretNotFound",
        event["message"],
        datetime(2026, 1, 2, tzinfo=UTC),
    )
    assert (
        event["metadata"]["name"] == again["metadata"]["name"] == "demo.2554620efa9a2172"
    )  # sha256("uid-1234/3/SecretNotFound/<message>")[:16]
    assert len({event["metadata"]["name"], other["metadata"]["name"], later["metadata"]["name"]}) == 3
    assert DNS_1123_SUBDOMAIN.match(event["metadata"]["name"])


# -- names -------------------------------------------------------------------------------------------------------------

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _dns_labels(rng: random.Random, count: int, max_length: int) -> list[str]:
    """Names the CRD accepts (DNS-1123 labels up to `max_length`), biased to the edges: full length, digit first."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-"
    names = []
    for _ in range(count):
        length = rng.choice([1, 2, max_length, max_length - 1, rng.randint(1, max_length)])
        middle = "".join(rng.choice(alphabet) for _ in range(max(length - 2, 0)))
        first = rng.choice("0123456789" if rng.random() < 0.3 else "abcdefghijklmnopqrstuvwxyz")
        names.append((first + middle + rng.choice("abc123"))[:length] if length > 1 else first)
    return names


def test_every_child_name_is_valid_unique_and_deterministic_for_every_accepted_job_name():
    rng = random.Random(7)
    jobs = _dns_labels(rng, 300, 63) + [
        "2026-run",
        "a" * 63,
        "a" * 58,
        "llama3-8b-instruct-sft-dpo-2026-11-30-a",
        "a-b",
        "a",
    ]
    stages = _dns_labels(rng, 12, 30) + ["sft", "preference-dpo", "b-c", "c", "b" * 30]
    seen: dict[str, dict[str, tuple]] = {"rayjob": {}, "configmap": {}, "account": {}}

    def claim(kind: str, name: str, owner: tuple) -> None:
        assert seen[kind].setdefault(name, owner) == owner, f"{kind} {name} of {owner} collides with {seen[kind][name]}"

    for job in jobs:
        assert DNS_1123_LABEL.match(job) and len(job) <= 63
        account = children.trainer_service_account_name(job)
        assert DNS_1123_SUBDOMAIN.match(account) and len(account) <= 253
        claim("account", account, (job,))
        for stage in stages:
            configmap = stage_configmap_name(job, stage)
            assert DNS_1123_SUBDOMAIN.match(configmap) and len(configmap) <= 253
            claim("configmap", configmap, (job, stage))
            for attempt in (1, 2, 3, 11):
                name = rayjob_name(job, stage, attempt)
                assert DNS_1035.match(name) and len(name) <= 47, name
                assert name == rayjob_name(job, stage, attempt)
                claim("rayjob", name, (job, stage, attempt))


def test_names_stay_readable():
    assert rayjob_name("demo", "sft", 1) == "demo-sft-1-5c480784"
    assert rayjob_name("2026-run", "sft", 1) == "r2026-run-sft-1-666e9389"
    assert rayjob_name("llama3-8b-instruct-sft-dpo-2026-11-30-a", "preference-dpo", 1) == (
        "llama3-8b-instruct-sf-preference-dpo-1-6f4dbfd7"
    )
    assert stage_configmap_name("demo", "sft") == "demo.sft.stage"


# -- Kueue -------------------------------------------------------------------------------------------------------------


def test_a_job_without_a_queue_label_gets_an_unsuspended_rayjob(job, sample_spec):
    plain = dataclasses.replace(job, labels={})
    spec = FineTuneJobSpec.model_validate(sample_spec())
    rayjob = children.rayjob(plain, spec, render_stage(job.name, spec, "sft", namespace="ml"), SETTINGS)
    assert rayjob["spec"]["suspend"] is False
    assert not any(key.startswith("kueue.x-k8s.io/") for key in rayjob["metadata"]["labels"])


def test_the_rayjob_carries_what_is_left_of_the_jobs_deadline(make_rayjob, job, sample_spec):
    spec = FineTuneJobSpec.model_validate(sample_spec())
    config = render_stage(job.name, spec, "sft", namespace="ml")
    assert (
        children.rayjob(job, spec, config, SETTINGS, active_deadline_seconds=3600)["spec"]["activeDeadlineSeconds"]
        == 3600
    )


# -- the stage config reaches the trainer byte for byte ----------------------------------------------------------------

# Plays `ray`: `job status` finds no job, `job submit -- ARGS` re-joins ARGS the way Ray's CLI does
# (ray/dashboard/modules/job/cli.py: shlex.join on POSIX, list2cmdline on Windows) and runs the string the way the job
# supervisor does (job_supervisor.py: Popen(shell=True), i.e. /bin/sh -c); `job logs` has nothing to add.
FAKE_RAY = """#!{python}
import shlex, subprocess, sys
args = sys.argv[1:]
if args[:2] == ["job", "status"]:
    sys.exit(1)
if args[:2] == ["job", "submit"]:
    entrypoint = shlex.join(args[args.index("--") + 1:])
    sys.exit(subprocess.run(entrypoint, shell=True).returncode)
sys.exit(0)
"""
# Plays the trainer's `python`: records its argv and the bytes of the file its `--config-file` names, read where the
# kubelet mounts the ConfigMap (FAKE_ROOT stands for the pod's filesystem root).
FAKE_PYTHON = """#!{python}
import json, os, sys
args = sys.argv[1:]
path = os.environ["FAKE_ROOT"] + args[args.index("--config-file") + 1]
with open(os.environ["FAKE_OUT"] + ".argv", "w") as out:
    json.dump(args, out)
with open(path, "rb") as source, open(os.environ["FAKE_OUT"] + ".config", "wb") as out:
    out.write(source.read())
"""
AWKWARD_TEMPLATE = (
    "{{\"<s>\"}}{% for m in messages %}{{ m['content'] }}{% endfor %} it's $HOME `id` \\\\n \\\" %s ${x:-y} ; | & "
)


@pytest.mark.parametrize("mode", ["K8sJobMode", "HTTPMode"])
def test_the_config_survives_kuberays_submission_and_rays_shell_byte_for_byte(tmp_path, job, sample_spec, mode):
    spec_wire = sample_spec()
    # The longest template the spec accepts (64 KiB): the config rides in a mounted file, never on a command line.
    spec_wire["model"]["chatTemplate"] = AWKWARD_TEMPLATE + "x" * (65536 - len(AWKWARD_TEMPLATE))
    spec = FineTuneJobSpec.model_validate(spec_wire)
    config = render_stage(job.name, spec, "sft", namespace=job.namespace)
    rayjob = children.rayjob(job, spec, config, SETTINGS)
    configmap = children.stage_configmap(job, config)
    # The kubelet's part: the ConfigMap's key as a file at the mount path.
    mounted = tmp_path / "root" / children.STAGE_CONFIG_PATH.lstrip("/")
    mounted.parent.mkdir(parents=True)
    mounted.write_bytes(configmap["data"][children.STAGE_CONFIG_KEY].encode())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in (("ray", FAKE_RAY), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(script.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_ROOT": str(tmp_path / "root"),
        "FAKE_OUT": str(tmp_path / "out"),
    }
    entrypoint = rayjob["spec"]["entrypoint"].strip()
    if mode == "K8sJobMode":
        # KubeRay's submitter: BuildJobSubmitCommand (ray-operator/controllers/ray/common/job.go) joins these words
        # with spaces and runs them with `/bin/bash -ce --` (configureSubmitterContainer, rayjob_controller.go).
        address, job_id = "http://head-svc:8265", "demo-sft-1-abcde"
        words = ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
        words += ["ray", "job", "submit", "--address", address, "--no-wait", "--submission-id", job_id]
        words += ["--", entrypoint, ";", "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
        command = ["/bin/bash", "-ce", "--", " ".join(words)]
    else:
        # HTTPMode: KubeRay posts the entrypoint to the Jobs API; the supervisor runs it with Popen(shell=True).
        command = ["/bin/sh", "-c", entrypoint]
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "out.argv").read_text()) == children.stage_command(config)[1:]
    received = (tmp_path / "out.config").read_bytes()
    assert received == stage_config_json(config).encode()
    assert StageConfig.model_validate_json(received).model.chat_template == spec_wire["model"]["chatTemplate"]


def test_the_stage_entrypoint_reads_its_config_from_a_file(tmp_path, job, sample_spec, monkeypatch):
    from finetune_trainer import stage

    spec = FineTuneJobSpec.model_validate(sample_spec())
    config = render_stage(job.name, spec, "sft", namespace=job.namespace)
    path = tmp_path / "config.json"
    path.write_text(stage_config_json(config))
    calls = []
    monkeypatch.setattr(stage, "run_from_args", lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
    argv = children.stage_command(config, config_path=str(path))
    with pytest.raises(SystemExit):
        stage.main(argv[3:])
    assert calls == [((str(path), None, "configmap://ml/demo.sft.stage"), {"use_ray": True})]


def test_a_config_too_large_for_its_configmap_fails_the_job_clearly(job, sample_spec, monkeypatch):
    from finetune_api import pipeline
    from finetune_api.pipeline import Observations, reconcile

    spec_wire = sample_spec()
    spec_wire["model"]["chatTemplate"] = "x" * 65536  # the longest the spec accepts fits: shrink the limit instead
    monkeypatch.setattr(pipeline, "STAGE_CONFIG_MAX_BYTES", 64 * 1024)
    decision = reconcile(job, spec_wire, None, Observations(), datetime(2026, 3, 1, tzinfo=UTC))
    assert decision.actions == []
    failed = decision.status.condition("Failed")
    assert failed.reason == "InvalidSpec" and "more than the" in failed.message and "ConfigMap" in failed.message


# -- GPU topology ------------------------------------------------------------------------------------------------------


def test_multi_gpu_worker_pods_spread_over_nodes_with_nccl_settings_and_shared_memory(make_rayjob, sample_spec):
    resources = {
        **sample_spec()["resources"],
        "gpusPerWorker": 8,
        "sharedMemory": "64Gi",
        "env": {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO"},
    }
    rayjob, _ = make_rayjob(stage="sft", attempt=1, resources=resources)
    [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    template = group["template"]
    pod = template["spec"]
    [container] = pod["containers"]
    assert group["replicas"] == 2 and container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_DEBUG"]) == ("eth0", "INFO")
    assert {"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert {"name": "shared-mem", "mountPath": "/dev/shm"} in container["volumeMounts"]
    [term] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector["ray.io/node-type"] == "worker" and selector["finetune.dev/attempt"] == "1"
    assert all(template["metadata"]["labels"][k] == v for k, v in selector.items() if k.startswith("finetune.dev/"))


def test_one_gpu_workers_get_default_nccl_logging_and_kuberays_shared_memory(make_rayjob):
    rayjob, _ = make_rayjob(stage="sft", attempt=1)
    pod = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in pod["containers"][0]["env"]
    assert "affinity" not in pod and not any(v["name"] == "shared-mem" for v in pod["volumes"])


def test_pull_secrets_come_from_the_operator_and_the_spec(job, sample_spec):
    spec_wire = sample_spec()
    spec_wire["resources"]["imagePullSecrets"] = ["team-registry", "shared"]
    spec = FineTuneJobSpec.model_validate(spec_wire)
    settings = Settings(image_pull_secrets=("shared", "mirror"))
    rayjob = children.rayjob(job, spec, render_stage(job.name, spec, "sft", namespace="ml"), settings)
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["spec"]["imagePullSecrets"] == [{"name": n} for n in ("shared", "mirror", "team-registry")]


def test_a_sized_scratch_volume(make_rayjob, sample_spec):
    resources = {**sample_spec()["resources"], "scratchSize": "200Gi"}
    rayjob, _ = make_rayjob(stage="sft", attempt=1, resources=resources)
    pod = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert {"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}} in pod["volumes"]
