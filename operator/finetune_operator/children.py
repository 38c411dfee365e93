"""Pure functions from a FineTuneJob to the manifests of its children; no API calls here.

Every child carries an owner reference to its FineTuneJob and the `finetune.dev/*` labels, so the operator
can find (and clean up) everything a job owns with one label selector.
"""

from __future__ import annotations

import hashlib
import shlex
import socket
from datetime import datetime
from typing import Any

from finetune_api.pipeline import JobRef
from finetune_api.render import (
    PVC_MOUNT_ROOT,
    StageConfig,
    rayjob_name,
    stage_config_json,
    stage_configmap_name,
)
from finetune_api.spec import API_VERSION, GROUP, KIND, FineTuneJobSpec, uri_scheme
from finetune_operator.settings import Settings

MANAGED_BY = "finetune-operator"
# Held on a job only while its deletion needs the operator (see Controller.needs_finalizer).
FINALIZER = f"{GROUP}/cleanup"
JOB_LABEL = "finetune.dev/job"
STAGE_LABEL = "finetune.dev/stage"
ATTEMPT_LABEL = "finetune.dev/attempt"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# Kueue admits RayJobs by these labels; they are copied from the FineTuneJob to each stage's RayJob.
# KubeRay labels each Ray pod `head` or `worker` (ray-operator/controllers/ray/utils/constant.go RayNodeTypeLabelKey).
RAY_NODE_TYPE_LABEL = "ray.io/node-type"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, "kueue.x-k8s.io/priority-class")
# Non-root uid/gid of the Ray images' `ray` user; fsGroup makes mounted volumes writable for it.
TRAINER_UID = 1000
STAGE_MODULE = "finetune_trainer.stage"
# The rendered StageConfig reaches the Ray pods as this file (a ConfigMap volume), never on the command line: the
# entrypoint passes through KubeRay's submission and Ray's `Popen(shell=True)`, which re-quote and re-split it.
STAGE_CONFIG_KEY = "config.json"
STAGE_CONFIG_DIR = "/etc/finetune/stage"
STAGE_CONFIG_PATH = f"{STAGE_CONFIG_DIR}/{STAGE_CONFIG_KEY}"
SCRATCH_DIR = "/scratch"


def child_labels(job: JobRef, stage: str | None = None, attempt: int | None = None) -> dict[str, str]:
    labels = {JOB_LABEL: job.name, MANAGED_BY_LABEL: MANAGED_BY}
    if stage is not None:
        labels[STAGE_LABEL] = stage
    if attempt is not None:
        labels[ATTEMPT_LABEL] = str(attempt)
    return labels


def job_selector(job_name: str) -> str:
    """Label selector matching every child of one job."""
    return f"{JOB_LABEL}={job_name},{MANAGED_BY_LABEL}={MANAGED_BY}"


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: JobRef, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": labels, "ownerReferences": [owner_reference(job)]}


def trainer_service_account_name(job_name: str) -> str:
    """ServiceAccount, Role and RoleBinding of the job's trainer. ServiceAccount names are DNS-1123 subdomains (253
    characters) and Role names path segments, so `<job>-trainer` (at most 71) is never cut and is unique per job."""
    return f"{job_name}-trainer"


def trainer_service_account(job: JobRef) -> dict[str, Any]:
    """The identity of the job's Ray pods (and of a local trainer's token)."""
    name = trainer_service_account_name(job.name)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(job, name, child_labels(job))}


def trainer_report_access(job: JobRef, spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Role + RoleBinding: the trainer may get/patch its job's stage ConfigMaps, nothing else."""
    name = trainer_service_account_name(job.name)
    labels = child_labels(job)
    stage_configmaps = sorted(stage_configmap_name(job.name, stage.name) for stage in spec.stages)
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(job, name, labels),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": stage_configmaps,
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(job, name, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": job.namespace}],
        },
    ]


def stage_configmap(job: JobRef, config: StageConfig) -> dict[str, Any]:
    """The stage's ConfigMap: the attempt's rendered StageConfig (`config.json`, mounted into its Ray pods at
    STAGE_CONFIG_PATH) and the trainer's progress (`report.json`, which it patches; a report names its attempt).

    One object per stage rather than a config and a report object per attempt: a retry replaces `config.json`.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            job, stage_configmap_name(job.name, config.stage.name), child_labels(job, config.stage.name)
        ),
        "data": {STAGE_CONFIG_KEY: stage_config_json(config)},
    }


def report_uri(namespace: str, configmap: str) -> str:
    return f"configmap://{namespace}/{configmap}"


def stage_command(
    config: StageConfig, config_path: str = STAGE_CONFIG_PATH, python: str = "python", no_ray: bool = False
) -> list[str]:
    """argv of the trainer entrypoint for one stage attempt, reading its StageConfig from `config_path`.

    Every word is plain (paths, DNS names), so the command reads the same after any shell's quoting."""
    namespace = config.namespace or "default"
    argv = [
        python,
        "-m",
        STAGE_MODULE,
        "--config-file",
        config_path,
        "--report",
        report_uri(namespace, stage_configmap_name(config.job_name, config.stage.name)),
    ]
    return argv + ["--no-ray"] if no_ray else argv


def referenced_secrets(spec: FineTuneJobSpec, stage_index: int | None = None) -> list[tuple[str, str]]:
    """(field path, Secret name) for every Secret the job (or one stage of it) needs, in spec order."""
    found: list[tuple[str, str]] = []
    if spec.model.credentials_secret:
        found.append(("spec.model.credentialsSecret", spec.model.credentials_secret))
    if spec.storage.credentials_secret:
        found.append(("spec.storage.credentialsSecret", spec.storage.credentials_secret))
    for index, stage in enumerate(spec.stages):
        if stage_index not in (None, index):
            continue
        for _, path, dataset in stage.data_sources():
            if dataset.credentials_secret:
                found.append((f"spec.stages[{index}].{path}.credentialsSecret", dataset.credentials_secret))
    found.extend((f"spec.envFromSecrets[{i}]", name) for i, name in enumerate(spec.env_from_secrets))
    return found


def pvc_claims(config: StageConfig) -> list[str]:
    """Claims named by `pvc://` URIs the stage reads or writes, in first-seen order."""
    uris = [
        config.input_model,
        config.reward_model,
        config.output_uri,
        config.checkpoint_dir,
        config.model.tokenizer,
        *(uri for _, _, dataset in config.stage.data_sources() for uri in (dataset.uri, dataset.validation_uri)),
        *(suite.uri for suite in config.suites),
    ]
    claims: list[str] = []
    for uri in uris:
        if uri and uri_scheme(uri) == "pvc":
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def _pod_template(
    config: StageConfig,
    settings: Settings,
    container: str,
    resources: dict[str, Any],
    secrets: list[str],
    claims: list[str],
    labels: dict[str, str],
) -> dict[str, Any]:
    compute = config.resources
    # Ray reports usage to usage-stats.ray.io unless told not to; a cluster's training runs are not ours to announce
    # (and an air-gapped head would retry the call for a minute). `resources.env` may turn it back on.
    values = {"FINETUNE_PVC_ROOT": PVC_MOUNT_ROOT, "FINETUNE_WORK_DIR": SCRATCH_DIR, "RAY_USAGE_STATS_ENABLED": "0"}
    if compute.gpus_per_worker == 0:
        # DeepSpeed picks its accelerator at import; without a GPU it must be told.
        values["DS_ACCELERATOR"] = "cpu"
    else:
        # NCCL's own account of a failed or slow collective (topology, transport) lands in the pod log.
        values["NCCL_DEBUG"] = "WARN"
    values.update(compute.env)
    env = [{"name": name, "value": value} for name, value in values.items()]
    mounts = [{"name": f"pvc-{i}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"} for i, claim in enumerate(claims)]
    mounts.append({"name": "stage-config", "mountPath": STAGE_CONFIG_DIR, "readOnly": True})
    mounts.append({"name": "scratch", "mountPath": SCRATCH_DIR})
    if compute.shared_memory:
        # KubeRay mounts its own /dev/shm only where none is (common/pod.go addEmptyDir, sized by the memory request).
        mounts.append({"name": "shared-mem", "mountPath": "/dev/shm"})
    volumes: list[dict[str, Any]] = [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}} for i, claim in enumerate(claims)
    ]
    volumes.append(
        {
            "name": "stage-config",
            "configMap": {
                "name": stage_configmap_name(config.job_name, config.stage.name),
                "items": [{"key": STAGE_CONFIG_KEY, "path": STAGE_CONFIG_KEY}],
            },
        }
    )
    # Caches, downloaded models and local checkpoints before upload: an emptyDir the kubelet accounts for (and evicts
    # the pod on, when it outgrows `scratchSize`) instead of the container's root filesystem.
    volumes.append({"name": "scratch", "emptyDir": {"sizeLimit": compute.scratch_size} if compute.scratch_size else {}})
    if compute.shared_memory:
        volumes.append({"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": compute.shared_memory}})
    pod: dict[str, Any] = {
        "serviceAccountName": trainer_service_account_name(config.job_name),
        # The trainer reports through the API with this token; the pod's setting overrides the ServiceAccount's.
        "automountServiceAccountToken": True,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            # Re-own a volume only when its root is not ours already: a recursive chown of a large model PVC on every
            # pod start can take longer than the start timeout.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": container,
                "image": compute.image or settings.trainer_image,
                "resources": resources,
                "env": env,
                "envFrom": [{"secretRef": {"name": name}} for name in secrets],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    pull_secrets = list(dict.fromkeys([*settings.image_pull_secrets, *compute.image_pull_secrets]))
    if pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in pull_secrets]
    if compute.node_selector:
        pod["nodeSelector"] = dict(compute.node_selector)
    if compute.tolerations:
        pod["tolerations"] = [t.to_wire() for t in compute.tolerations]
    return {"metadata": {"labels": labels}, "spec": pod}


def _one_pod_per_node(labels: dict[str, str]) -> dict[str, Any]:
    """Keep multi-GPU worker pods of one attempt on separate nodes (preferred: a node with room for two still helps)."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {**labels, RAY_NODE_TYPE_LABEL: "worker"}},
                    },
                }
            ]
        }
    }


def is_kueue_managed(job: JobRef) -> bool:
    """Whether the job's RayJobs go through Kueue: they carry its queue label (copied from the FineTuneJob)."""
    return bool(job.labels.get(KUEUE_QUEUE_LABEL))


def rayjob(
    job: JobRef,
    spec: FineTuneJobSpec,
    config: StageConfig,
    settings: Settings,
    active_deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """The RayJob (ray.io/v1) running one stage attempt: a head node for the driver plus one worker group."""
    compute = config.resources
    secrets = list(dict.fromkeys(name for _, name in referenced_secrets(spec, config.stage_index)))
    claims = pvc_claims(config)
    worker_resources: dict[str, Any] = {"cpu": str(compute.cpus_per_worker)}
    if compute.memory_per_worker:
        worker_resources["memory"] = compute.memory_per_worker
    worker_limits = dict(worker_resources)
    if compute.gpus_per_worker:
        worker_limits[compute.gpu_resource_name] = str(compute.gpus_per_worker)
    head_resources = {"cpu": settings.head_cpu, "memory": settings.head_memory}
    labels = child_labels(job, config.stage.name, config.attempt)
    pod_labels = dict(labels)
    labels.update({key: job.labels[key] for key in KUEUE_LABELS if key in job.labels})
    worker_template = _pod_template(
        config,
        settings,
        "ray-worker",
        {"requests": worker_resources, "limits": worker_limits},
        secrets,
        claims,
        pod_labels,
    )
    if compute.gpus_per_worker > 1 and compute.workers > 1:
        worker_template["spec"]["affinity"] = _one_pod_per_node(pod_labels)
    rayjob_spec: dict[str, Any] = {
        "entrypoint": shlex.join(stage_command(config)),
        # KubeRay's operator submits the entrypoint through the head's Jobs API (rayjob_controller.go, HTTPMode): no
        # submitter pod, so nothing that Pod Security `restricted` could refuse, no pull secrets or tolerations to
        # copy, and no submitter PodSet for Kueue to count (kueue rayjob_controller.go, addSubmitterPodSet).
        "submissionMode": "HTTPMode",
        # Needed to suspend (KubeRay utils/validation.go ValidateRayJobSpec) and by Kueue's webhook, which also wants
        # no autoscaling and no clusterSelector (kueue pkg/controller/jobs/rayjob/rayjob_webhook.go validateCreate).
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": settings.rayjob_ttl_seconds,
        # Kueue's webhook sets suspend on every RayJob with a queue label and clears it on admission
        # (kueue jobframework/defaults.go ApplyDefaultForSuspend); created suspended, nothing starts without quota.
        "suspend": is_kueue_managed(job),
        "rayClusterSpec": {
            "headGroupSpec": {
                # The head hosts the driver only: training workers land on the worker group.
                "rayStartParams": {"num-cpus": "0"},
                "template": _pod_template(
                    config,
                    settings,
                    "ray-head",
                    {"requests": head_resources, "limits": head_resources},
                    secrets,
                    claims,
                    pod_labels,
                ),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": compute.workers,
                    "minReplicas": compute.workers,
                    "maxReplicas": compute.workers,
                    "rayStartParams": {},
                    "template": worker_template,
                }
            ],
        },
    }
    if active_deadline_seconds is not None:
        # KubeRay fails the RayJob once it has existed this long since its (re)start, even while Initializing.
        rayjob_spec["activeDeadlineSeconds"] = max(int(active_deadline_seconds), 1)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(job, rayjob_name(job.name, config.stage.name, config.attempt), labels),
        "spec": rayjob_spec,
    }


def event_name(job: JobRef, reason: str, key: str) -> str:
    """One name per happening: the same transition, decided again after a crash or a refused status write, names
    the same Event, so posting it is create-if-absent and it appears exactly once. `key` says what the Event is
    about (a stage attempt, say); without one, its message does."""
    digest = hashlib.sha256(f"{job.uid}/{job.generation}/{reason}/{key}".encode()).hexdigest()[:16]
    return f"{job.name}.{digest}"


def event(job: JobRef, type_: str, reason: str, message: str, now: datetime, key: str = "") -> dict[str, Any]:
    """A core/v1 Event about the FineTuneJob (messages never carry Secret values: only names)."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(job, reason, key or message), "namespace": job.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.name,
            "namespace": job.namespace,
            "uid": job.uid,
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": MANAGED_BY},
        "reportingComponent": MANAGED_BY,
        "reportingInstance": socket.gethostname(),
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
