"""The operator among the real neighbours: the KubeRay operator, kube-scheduler, KWOK GPU nodes, the garbage collector.

Nothing here plays KubeRay: the RayClusters and Pods are KubeRay's, the scheduler binds them, KWOK (no kubelet)
marks them Running and Ready. No Ray runs inside, so no Ray job ever finishes: KubeRay's own transitions go as far as
`Running` (cluster Ready, submitter Job created), and that is as far as these tests take them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_api.render import rayjob_name, stage_configmap_name
from finetune_dev import ApiError, ControlPlane
from finetune_dev.testing import OperatorProcess, install_chart_rbac
from finetune_operator.children import trainer_service_account_name

KUBERAY = ("kube-controller-manager", "kube-scheduler", "kwok", "kuberay-operator")
pytestmark = [pytest.mark.slow, pytest.mark.neighbours(*KUBERAY)]

GPU = "nvidia.com/gpu"
GPU_POOL = {"finetune.dev/pool": "gpu"}
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
# How long a stage may sit with its Ray cluster initializing (FINETUNE_START_TIMEOUT_SECONDS), and how long a test
# waits for it to give up. Pods on KWOK nodes are Ready within seconds, so only a cluster that cannot start hits it.
START_TIMEOUT = 45
FAST = {
    "FINETUNE_RETRY_BASE_SECONDS": "1",
    "FINETUNE_SECRET_RECHECK_SECONDS": "1",
    "FINETUNE_RESYNC_SECONDS": "5",
    "FINETUNE_START_TIMEOUT_SECONDS": str(START_TIMEOUT),
}
# GPU nodes of 4 GPUs each, and one plain node for pods that do not tolerate the GPU taint (KubeRay's submitter).
GPU_NODES = ("gpu-0", "gpu-1", "gpu-2")
GPUS_PER_NODE = 4


def wait(check: Callable[[], Any], what: str, timeout: float = 90.0, log: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{log()}" if log else ""))
        time.sleep(0.5)


class Neighbourhood:
    """One namespace on a cluster with real neighbours, and the operator (the chart's RBAC, kuberay executor)."""

    def __init__(self, cluster: ControlPlane, namespace: str, operator: OperatorProcess):
        self.cluster, self.namespace, self.operator = cluster, namespace, operator

    def path(self, group_version: str, plural: str, name: str = "") -> str:
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        return f"{prefix}/namespaces/{self.namespace}/{plural}" + (f"/{name}" if name else "")

    def get(self, group_version: str, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return self.cluster.api("GET", self.path(group_version, plural, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, group_version: str, plural: str, selector: str = "") -> list[dict[str, Any]]:
        query = f"?labelSelector={selector}" if selector else ""
        return self.cluster.api("GET", self.path(group_version, plural) + query).get("items", [])

    def create_job(self, name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
        manifest = job_manifest(name, **spec)
        manifest["metadata"].update(namespace=self.namespace, labels=labels or {})
        return self.cluster.api("POST", self.path("finetune.dev/v1alpha1", "finetunejobs"), manifest)

    def job(self, name: str) -> dict[str, Any] | None:
        return self.get("finetune.dev/v1alpha1", "finetunejobs", name)

    def condition(self, job: str, type_: str) -> dict[str, Any]:
        conditions = ((self.job(job) or {}).get("status") or {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == type_), {})

    def rayjob(self, name: str) -> dict[str, Any] | None:
        return self.get("ray.io/v1", "rayjobs", name)

    def raycluster_of(self, rayjob: str) -> dict[str, Any] | None:
        name = ((self.rayjob(rayjob) or {}).get("status") or {}).get("rayClusterName")
        return self.get("ray.io/v1", "rayclusters", name) if name else None

    def ray_pods(self, raycluster: str) -> list[dict[str, Any]]:
        return self.list("v1", "pods", f"ray.io/cluster={raycluster}")

    def events(self) -> str:
        items = self.list("v1", "events")
        return "\n".join(
            f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['reason']}: {e.get('message', '')}"
            for e in sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])
        )

    def diagnostics(self) -> str:
        return f"--- events ---\n{self.events()}\n--- operator log ---\n{self.operator.log_tail(40)}"

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        return wait(check, what, timeout, self.diagnostics)

    def wait_for_ready_pods(self, rayjob: str, count: int) -> list[dict[str, Any]]:
        """The RayCluster KubeRay made for `rayjob`, once `count` of its Pods are bound and Ready."""

        def ready() -> list[dict[str, Any]] | None:
            raycluster = self.raycluster_of(rayjob)
            pods = self.ray_pods(raycluster["metadata"]["name"]) if raycluster else []
            ready = [p for p in pods if p["spec"].get("nodeName") and _condition(p, "Ready") == "True"]
            return ready if len(ready) == count else None

        return self.wait(ready, f"{count} Ready Pods of {rayjob}'s RayCluster")


def _condition(obj: dict[str, Any], type_: str) -> str | None:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base = {
        "model": {"source": "s3://models/base"},
        "storage": {"uri": f"pvc://runs/{name}"},
        "backoffLimit": 0,
        "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}}],
        "resources": gpu_resources(workers=2, gpus=2),
    }
    base.update(spec)
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": base}


def gpu_resources(workers: int, gpus: int) -> dict[str, Any]:
    return {
        "workers": workers,
        "gpusPerWorker": gpus,
        "cpusPerWorker": 4,
        "memoryPerWorker": "16Gi",
        "nodeSelector": dict(GPU_POOL),
        "tolerations": [dict(GPU_TOLERATION)],
        "image": "rayproject/ray:2.60.0-py312",
    }


def ensure_nodes(cluster: ControlPlane) -> None:
    existing = {n["metadata"]["name"] for n in cluster.api("GET", "/api/v1/nodes").get("items", [])}
    for name in GPU_NODES:
        if name not in existing:
            cluster.create_node(name, gpus=GPUS_PER_NODE, labels=GPU_POOL)
    if "cpu-0" not in existing:
        cluster.create_node("cpu-0")


def create_bound_claim(cluster: ControlPlane, namespace: str, claim: str) -> None:
    """A PVC bound to a hostPath PV (kube-controller-manager's PV binder binds them), as `pvc://` storage needs."""
    volume = f"{namespace}-{claim}"
    cluster.api(
        "POST",
        "/api/v1/persistentvolumes",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": f"/tmp/{volume}"},
                "claimRef": {"namespace": namespace, "name": claim},
                "storageClassName": "",
            },
        },
    )
    cluster.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/persistentvolumeclaims",
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "10Gi"}},
                "volumeName": volume,
                "storageClassName": "",
            },
        },
    )
    wait(
        lambda: (
            cluster.api("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            .get("status", {})
            .get("phase")
            == "Bound"
        ),
        f"PVC {namespace}/{claim} Bound",
    )


def start_neighbourhood(cluster: ControlPlane, tmp_path: Path, labels: dict[str, str] | None = None):
    ensure_nodes(cluster)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    cluster.api(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels or {}}},
    )
    # kube-controller-manager creates the namespace's `default` ServiceAccount; Pods wait for it.
    wait(
        lambda: _exists(cluster, f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        "the default ServiceAccount",
    )
    create_bound_claim(cluster, namespace, "runs")
    kubeconfig = install_chart_rbac(cluster, f"op-{namespace}", namespace, "kuberay", [namespace])
    return OperatorProcess(kubeconfig, tmp_path / "operator.log", "kuberay", (namespace,), env=FAST), namespace


def _exists(cluster: ControlPlane, path: str) -> bool:
    try:
        cluster.api("GET", path)
        return True
    except ApiError as error:
        if error.status == 404:
            return False
        raise


def neighbourhood(cluster: ControlPlane, tmp_path: Path, labels: dict[str, str] | None = None):
    operator, namespace = start_neighbourhood(cluster, tmp_path, labels)
    with operator:
        yield Neighbourhood(cluster, namespace, operator)
    # The namespace controller deletes what is left, so the next test finds the nodes' GPUs free.
    cluster.api("DELETE", f"/api/v1/namespaces/{namespace}")


@pytest.fixture
def hood(cluster: ControlPlane, tmp_path: Path):
    yield from neighbourhood(cluster, tmp_path)


@pytest.fixture
def restricted_hood(cluster: ControlPlane, tmp_path: Path):
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    yield from neighbourhood(cluster, tmp_path, labels)


def deployment_status(hood: Neighbourhood, rayjob: str) -> str:
    """KubeRay's jobDeploymentStatus; empty until KubeRay has validated the RayJob."""
    return ((hood.rayjob(rayjob) or {}).get("status") or {}).get("jobDeploymentStatus") or ""


def test_kuberay_builds_our_ray_cluster_and_the_pods_run_on_gpu_nodes(hood: Neighbourhood):
    hood.create_job("place")
    # KubeRay validates a RayJob before it builds anything (ray-operator/controllers/ray/utils/validation.go,
    # ValidateRayJobMetadata/Spec) and reports a failure as ValidationFailed.
    status = hood.wait(lambda: deployment_status(hood, rayjob_name("place", "sft", 1)), "KubeRay to pick up the RayJob")
    assert status != "ValidationFailed", hood.rayjob(rayjob_name("place", "sft", 1))["status"]
    raycluster = hood.wait(lambda: hood.raycluster_of(rayjob_name("place", "sft", 1)), "KubeRay's RayCluster")

    workers = raycluster["spec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2
    pods = hood.wait_for_ready_pods(rayjob_name("place", "sft", 1), count=3)
    by_type = {}
    for pod in pods:
        by_type.setdefault(pod["metadata"]["labels"]["ray.io/node-type"], []).append(pod)
    assert len(by_type["head"]) == 1 and len(by_type["worker"]) == 2

    for pod in pods:
        spec = pod["spec"]
        assert spec["serviceAccountName"] == trainer_service_account_name("place")
        assert spec["nodeSelector"] == GPU_POOL
        assert GPU_TOLERATION in spec["tolerations"]
        assert spec["nodeName"] in GPU_NODES
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = spec["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["image"] == "rayproject/ray:2.60.0-py312"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["runs"]
    for worker in by_type["worker"]:
        resources = worker["spec"]["containers"][0]["resources"]
        assert resources["limits"][GPU] == "2"
        assert resources["requests"]["cpu"] == "4" and resources["requests"]["memory"] == "16Gi"
    # Two workers of 2 GPUs on nodes of 4: the scheduler may pack them, but never beyond a node's GPUs.
    used: dict[str, int] = {}
    for worker in by_type["worker"]:
        used[worker["spec"]["nodeName"]] = used.get(worker["spec"]["nodeName"], 0) + 2
    assert max(used.values()) <= GPUS_PER_NODE

    # With the cluster Ready, KubeRay creates the submitter Job and reports the RayJob Running; the operator
    # mirrors that into the stage.
    hood.wait(
        lambda: (
            (hood.rayjob(rayjob_name("place", "sft", 1)).get("status") or {}).get("jobDeploymentStatus") == "Running"
        ),
        "KubeRay to report the RayJob Running",
    )
    hood.wait(lambda: hood.condition("place", "Running").get("reason") == "StageRunning", "the stage Running")


def test_a_long_job_name_passes_kuberays_name_validation(hood: Neighbourhood):
    name = "a-job-whose-name-is-quite-long-but-still-valid-for-kubernetes"
    hood.create_job(name)

    def rayjob_status() -> tuple[str, str] | None:
        for rayjob in hood.list("ray.io/v1", "rayjobs", f"finetune.dev/job={name}"):
            status = (rayjob.get("status") or {}).get("jobDeploymentStatus")
            if status:
                return rayjob["metadata"]["name"], status
        return None

    rayjob, status = hood.wait(rayjob_status, "KubeRay to pick up the RayJob")
    assert status != "ValidationFailed", hood.rayjob(rayjob)["status"]
    hood.wait(lambda: hood.raycluster_of(rayjob), "KubeRay's RayCluster")


def test_deleting_a_job_removes_every_child_through_garbage_collection(hood: Neighbourhood):
    """A job that keeps its artifacts has no finalizer, and the operator is stopped before the delete: owner
    references and kube-controller-manager's garbage collector alone remove the RayJob and what KubeRay made from it
    (RayCluster, Pods, Services, and the submitter Job where the submission mode has one), and the trainer's
    ServiceAccount, Role, RoleBinding and stage ConfigMap."""
    rayjob = rayjob_name("gc", "sft", 1)
    hood.create_job("gc")
    hood.wait_for_ready_pods(rayjob, count=3)
    # Running: KubeRay has created everything it creates for a RayJob.
    hood.wait(lambda: deployment_status(hood, rayjob) == "Running", "KubeRay to report the RayJob Running")
    job_uid = hood.job("gc")["metadata"]["uid"]

    children = {
        ("v1", "serviceaccounts"): [trainer_service_account_name("gc")],
        ("rbac.authorization.k8s.io/v1", "roles"): [trainer_service_account_name("gc")],
        ("rbac.authorization.k8s.io/v1", "rolebindings"): [trainer_service_account_name("gc")],
        ("v1", "configmaps"): [stage_configmap_name("gc", "sft")],
    }
    for group_version, plural in (
        ("ray.io/v1", "rayjobs"),
        ("ray.io/v1", "rayclusters"),
        ("v1", "pods"),
        ("v1", "services"),
        ("batch/v1", "jobs"),
    ):
        children[(group_version, plural)] = [item["metadata"]["name"] for item in hood.list(group_version, plural)]
    for (group_version, plural), names in children.items():
        for name in names:
            assert hood.get(group_version, plural, name), f"{plural}/{name} should exist before the delete"
    assert len(children[("v1", "pods")]) >= 3 and children[("ray.io/v1", "rayclusters")]

    assert not hood.job("gc")["metadata"].get("finalizers")
    hood.operator.stop()
    hood.cluster.api("DELETE", hood.path("finetune.dev/v1alpha1", "finetunejobs", "gc"))

    def all_gone() -> bool:
        return not [f"{p}/{n}" for (g, p), names in children.items() for n in names if hood.get(g, p, n)]

    wait(all_gone, "garbage collection of every child", timeout=120)
    assert not any(
        ref.get("uid") == job_uid
        for item in hood.list("v1", "configmaps") + hood.list("v1", "serviceaccounts")
        for ref in item["metadata"].get("ownerReferences", [])
    )


def test_everything_we_create_is_admitted_under_pod_security_restricted(restricted_hood: Neighbourhood):
    hood = restricted_hood
    rayjob = rayjob_name("psa", "sft", 1)
    hood.create_job("psa")
    # Head and workers: their Pod template is ours.
    hood.wait_for_ready_pods(rayjob, count=3)
    hood.wait(lambda: deployment_status(hood, rayjob) == "Running", "KubeRay to report the RayJob Running")
    # K8sJobMode (KubeRay's default) submits through a Job whose Pod KubeRay builds; HTTPMode has none.
    if (hood.rayjob(rayjob)["spec"].get("submissionMode") or "K8sJobMode") == "K8sJobMode":
        submitter = hood.wait(lambda: hood.get("batch/v1", "jobs", rayjob), "KubeRay's submitter Job")
        selector = f"batch.kubernetes.io/controller-uid={submitter['metadata']['uid']}"
        # A refused Pod shows only as a FailedCreate Event on the Job; an admitted one exists.
        hood.wait(lambda: hood.list("v1", "pods", selector), "the submitter Pod to be admitted", timeout=60)
    refused = [e["message"] for e in hood.list("v1", "events") if "PodSecurity" in e.get("message", "")]
    assert not refused, refused


def test_unschedulable_gpus_fail_the_attempt_with_the_schedulers_reason(hood: Neighbourhood):
    # One worker wants 8 GPUs; no node has more than 4.
    hood.create_job("toobig", resources=gpu_resources(workers=1, gpus=2 * GPUS_PER_NODE))
    hood.wait(lambda: hood.raycluster_of(rayjob_name("toobig", "sft", 1)), "KubeRay's RayCluster")

    def worker_unschedulable() -> str | None:
        raycluster = hood.raycluster_of(rayjob_name("toobig", "sft", 1))
        for pod in hood.ray_pods(raycluster["metadata"]["name"]):
            scheduled = next((c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"), {})
            if scheduled.get("reason") == "Unschedulable":
                return scheduled["message"]
        return None

    message = hood.wait(worker_unschedulable, "the scheduler to refuse the GPU worker")
    assert f"Insufficient {GPU}" in message

    def left_initializing() -> dict[str, Any] | None:
        running = hood.condition("toobig", "Running")
        return None if running.get("reason") in (None, "ClusterInitializing", "StageStarting") else running

    # Not Initializing forever: within the start timeout the stage fails, saying why.
    hood.wait(left_initializing, "the stage to leave Initializing", timeout=START_TIMEOUT + 60)
    failed = hood.condition("toobig", "Failed")
    assert failed.get("status") == "True", json.dumps(hood.job("toobig")["status"], indent=2)
    assert f"Insufficient {GPU}" in failed["message"]


# -- Kueue --------------------------------------------------------------------------------------------------------

KUEUE_API = "kueue.x-k8s.io/v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def create_gpu_queue(cluster: ControlPlane, namespace: str, gpus: int) -> str:
    """A ClusterQueue with a GPU quota (CPU and memory plentiful) and a LocalQueue `gpus` in `namespace` on it."""
    flavor, queue = f"flavor-{namespace}", f"cq-{namespace}"
    cluster.api(
        "POST",
        f"/apis/{KUEUE_API}/resourceflavors",
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": flavor}, "spec": {}},
    )
    quotas = {"cpu": "1000", "memory": "10Ti", GPU: str(gpus)}
    cluster.api(
        "POST",
        f"/apis/{KUEUE_API}/clusterqueues",
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": list(quotas),
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [{"name": k, "nominalQuota": v} for k, v in quotas.items()],
                            }
                        ],
                    }
                ],
            },
        },
    )
    cluster.api(
        "POST",
        f"/apis/{KUEUE_API}/namespaces/{namespace}/localqueues",
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": "gpus", "namespace": namespace},
            "spec": {"clusterQueue": queue},
        },
    )
    return "gpus"


def workload_of(hood: Neighbourhood, rayjob: str) -> dict[str, Any] | None:
    return next(
        (
            w
            for w in hood.list(KUEUE_API, "workloads")
            if any(ref["name"] == rayjob for ref in w["metadata"].get("ownerReferences", []))
        ),
        None,
    )


@pytest.mark.neighbours(*KUBERAY, "kueue")
def test_kueue_admits_one_job_and_holds_the_other(hood: Neighbourhood):
    """Kueue's webhook creates each queued RayJob suspended (rayjob_webhook.go Default -> ApplyDefaultForSuspend)
    and un-suspends it on admission; the operator must leave `spec.suspend` to Kueue."""
    # Each job asks for 2 workers x 2 GPUs; the queue has 6 GPUs: one job fits, two do not.
    queue = create_gpu_queue(hood.cluster, hood.namespace, gpus=6)
    hood.create_job("first", labels={QUEUE_LABEL: queue})
    hood.wait(lambda: workload_of(hood, rayjob_name("first", "sft", 1)), "Kueue's Workload for the first job")
    hood.create_job("second", labels={QUEUE_LABEL: queue})

    hood.wait(
        lambda: _condition(workload_of(hood, rayjob_name("first", "sft", 1)) or {}, "Admitted") == "True",
        "first admitted",
    )
    hood.wait_for_ready_pods(rayjob_name("first", "sft", 1), count=3)
    second = hood.wait(
        lambda: workload_of(hood, rayjob_name("second", "sft", 1)), "Kueue's Workload for the second job"
    )
    assert _condition(second, "Admitted") != "True"

    # For as long as the first holds the quota, the second has no Ray cluster, not even briefly.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rayjob = hood.rayjob(rayjob_name("second", "sft", 1))
        assert rayjob["spec"].get("suspend") is True, f"the held RayJob was un-suspended\n{hood.diagnostics()}"
        assert hood.raycluster_of(rayjob_name("second", "sft", 1)) is None and not hood.list(
            "ray.io/v1", "rayclusters", f"ray.io/originated-from-cr-name={rayjob_name('second', 'sft', 1)}"
        ), f"a Ray cluster was built for the held job\n{hood.diagnostics()}"
        time.sleep(0.5)
    assert _condition(workload_of(hood, rayjob_name("second", "sft", 1)), "Admitted") != "True"
    # Nor was the first one's cluster built before Kueue admitted it (Kueue would stop it again).
    stopped = [e for e in hood.list("v1", "events") if e["reason"] == "Stopped"]
    assert not stopped, f"Kueue had to stop a RayJob it had not admitted\n{hood.diagnostics()}"

    # Deleting the first job frees its quota (its RayJob and Workload go with it): the second is admitted and runs.
    hood.cluster.api("DELETE", hood.path("finetune.dev/v1alpha1", "finetunejobs", "first"))
    hood.wait(
        lambda: _condition(workload_of(hood, rayjob_name("second", "sft", 1)) or {}, "Admitted") == "True",
        "second admitted",
    )
    hood.wait_for_ready_pods(rayjob_name("second", "sft", 1), count=3)


def ray_clusters_of_job(hood: Neighbourhood, job: str) -> list[str]:
    """Names of the RayClusters KubeRay built for any RayJob of FineTuneJob `job`."""
    names = []
    for rayjob in hood.list("ray.io/v1", "rayjobs", f"finetune.dev/job={job}"):
        selector = f"ray.io/originated-from-cr-name={rayjob['metadata']['name']}"
        names += [c["metadata"]["name"] for c in hood.list("ray.io/v1", "rayclusters", selector)]
    return names


def assert_no_ray_cluster_for(hood: Neighbourhood, job: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        built = ray_clusters_of_job(hood, job)
        assert not built, f"Ray cluster {built} built for the held job {job}\n{hood.diagnostics()}"
        time.sleep(0.5)


@pytest.mark.neighbours(*KUBERAY, "kueue")
def test_suspend_and_resume_of_a_queued_job_keep_it_off_the_cluster(hood: Neighbourhood):
    queue = create_gpu_queue(hood.cluster, hood.namespace, gpus=6)
    hood.create_job("holder", labels={QUEUE_LABEL: queue})
    hood.wait(
        lambda: _condition(workload_of(hood, rayjob_name("holder", "sft", 1)) or {}, "Admitted") == "True",
        "holder admitted",
    )
    hood.create_job("held", labels={QUEUE_LABEL: queue})
    hood.wait(lambda: hood.list("ray.io/v1", "rayjobs", "finetune.dev/job=held"), "the held job's RayJob")
    assert_no_ray_cluster_for(hood, "held", 10)

    def set_suspend(value: bool) -> None:
        hood.cluster.api(
            "PATCH",
            hood.path("finetune.dev/v1alpha1", "finetunejobs", "held"),
            {"spec": {"suspend": value}},
            content_type="application/merge-patch+json",
        )

    set_suspend(True)
    hood.wait(lambda: ((hood.job("held") or {}).get("status") or {}).get("phase") == "Suspended", "held Suspended")
    assert_no_ray_cluster_for(hood, "held", 10)
    # Resumed, it goes back to the queue: the holder still has the GPUs.
    set_suspend(False)
    assert_no_ray_cluster_for(hood, "held", 20)
