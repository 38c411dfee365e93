"""The local control plane is a real, RBAC-enforcing Kubernetes API with KubeRay's CRDs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from finetune_dev import ControlPlane
from finetune_dev.binaries import REPO_ROOT

CHART_DIR = REPO_ROOT / "charts" / "finetune-operator"
REPO_CRDS = sorted((REPO_ROOT / "crds").glob("*.yaml"))


def _eventually(check, timeout: float = 15.0):
    """RBAC changes reach the authorizer through an informer, so allow them a moment."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_apiserver_answers_with_pinned_version(control_plane: ControlPlane):
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    pinned = control_plane.binaries.versions.kubernetes
    assert version["serverVersion"]["gitVersion"] == pinned
    assert version["clientVersion"]["gitVersion"] == pinned


def test_python_client_uses_admin_kubeconfig(control_plane: ControlPlane):
    kubernetes = pytest.importorskip("kubernetes")
    api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(control_plane.kubeconfig)))
    names = {ns.metadata.name for ns in api.list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_rbac_is_enforced_for_service_accounts(control_plane: ControlPlane, namespace: str):
    control_plane.kubectl("create", "serviceaccount", "probe", "-n", namespace)
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "probe")

    denied = control_plane.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    assert f"system:serviceaccount:{namespace}:probe" in denied.stderr

    control_plane.kubectl("create", "role", "pod-reader", "--verb=get,list,watch", "--resource=pods", "-n", namespace)
    control_plane.kubectl(
        "create",
        "rolebinding",
        "probe-reads-pods",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:probe",
        "-n",
        namespace,
    )
    allowed = _eventually(
        lambda: (
            control_plane.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False).returncode == 0
        )
    )
    assert allowed, "the RoleBinding never took effect"

    # The grant is exactly what the Role says: no writes, and nothing in other namespaces.
    for argv in (["create", "configmap", "x", "-n", namespace], ["get", "pods", "-n", "default"]):
        result = control_plane.kubectl(*argv, kubeconfig=kubeconfig, check=False)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), argv


RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "sft-smoke"},
    "spec": {
        "entrypoint": "python -m finetune_trainer run /config/job.yaml",
        "shutdownAfterJobFinishes": True,
        "rayClusterSpec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "ray-head", "image": "rayproject/ray:2.46.0"},
                        ]
                    }
                },
            },
        },
    },
}


def test_rayjob_crd_serves_spec_and_status_subresource(control_plane: ControlPlane, namespace: str):
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(RAYJOB))

    # What KubeRay's controller writes as the job progresses.
    status = {
        "jobDeploymentStatus": "Running",
        "jobStatus": "RUNNING",
        "jobId": "sft-smoke-abc12",
        "rayClusterName": "sft-smoke-raycluster-x",
    }
    control_plane.kubectl(
        "patch",
        "rayjob",
        "sft-smoke",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    # Through the main resource, status is ignored: the subresource is really separate.
    control_plane.kubectl(
        "patch",
        "rayjob",
        "sft-smoke",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"status": {"jobStatus": "FAILED"}}),
    )

    job = json.loads(control_plane.kubectl("get", "rayjob", "sft-smoke", "-n", namespace, "-o", "json").stdout)
    assert job["spec"]["entrypoint"] == RAYJOB["spec"]["entrypoint"]
    assert {k: job["status"][k] for k in status} == status


def test_rayjob_crd_rejects_invalid_objects(control_plane: ControlPlane, namespace: str):
    bad = {**RAYJOB, "spec": {**RAYJOB["spec"], "shutdownAfterJobFinishes": "yes please"}}
    result = control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert "shutdownAfterJobFinishes" in result.stderr


def test_kuberay_and_repo_crds_are_established(control_plane: ControlPlane):
    crds = json.loads(control_plane.kubectl("get", "crd", "-o", "json").stdout)["items"]
    established = {
        crd["metadata"]["name"]
        for crd in crds
        if any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    }
    assert {"rayjobs.ray.io", "rayclusters.ray.io"} <= established
    for path in REPO_CRDS:
        names = control_plane.kubectl("get", "-f", str(path), "-o", "name").stdout.split()
        assert names and all(n.split("/", 1)[1] in established for n in names), path


def test_helm_runs_against_the_cluster(control_plane: ControlPlane):
    version = control_plane.helm("version", "--short").stdout
    assert version.startswith(control_plane.binaries.versions.helm)
    assert control_plane.helm("list", "--all-namespaces").returncode == 0


@pytest.mark.skipif(not CHART_DIR.is_dir(), reason=f"no chart at {CHART_DIR} yet")
def test_operator_chart_lints_and_renders_valid_objects(control_plane: ControlPlane, namespace: str):
    control_plane.helm("lint", str(CHART_DIR))
    rendered = control_plane.helm("template", "finetune-operator", str(CHART_DIR), "--namespace", namespace).stdout
    assert rendered.strip(), "the chart rendered nothing"
    # The apiserver validates every rendered object against its real schema without storing it.
    control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)


def test_admin_kubeconfig_is_cluster_admin(control_plane: ControlPlane):
    config = json.loads(Path(control_plane.kubeconfig).read_text())
    assert config["clusters"][0]["cluster"]["server"] == control_plane.url
    assert control_plane.kubectl("auth", "can-i", "*", "*", "--all-namespaces").stdout.strip() == "yes"
