"""`helm install` of the chart into a real API server: objects are created and its RBAC lets the operator do exactly
its job (no pods run: the control plane has no nodes)."""

from __future__ import annotations

import json
import time
import uuid

from finetune_dev import ControlPlane
from finetune_dev.binaries import REPO_ROOT

CHART = REPO_ROOT / "charts" / "finetune-operator"


def install(cp: ControlPlane, namespace: str, *values: str) -> str:
    release = f"ft-{uuid.uuid4().hex[:6]}"
    cp.helm("install", release, str(CHART), "--namespace", namespace, "--wait=false", *values)
    return release


def can(cp: ControlPlane, user: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    """`resource` is `plural.group`, `plural.group:subresource` or `plural.group/name`."""
    scope = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    resource, _, subresource = resource.partition(":")
    extra = [f"--subresource={subresource}"] if subresource else []
    return (
        cp.kubectl("auth", "can-i", verb, resource, *extra, "--as", user, *scope, check=False).stdout.strip() == "yes"
    )


def eventually(check, timeout: float = 15.0) -> bool:
    """RBAC changes reach the authorizer through an informer, so allow them a moment."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def operator_user(namespace: str, release: str) -> str:
    return f"system:serviceaccount:{namespace}:{release}-finetune-operator"


def test_cluster_wide_install_creates_objects_and_least_privilege_rbac(control_plane: ControlPlane, namespace: str):
    release = install(control_plane, namespace)
    name = f"{release}-finetune-operator"
    for kind in ("deployment", "serviceaccount", "service"):
        control_plane.kubectl("get", kind, name if kind != "service" else f"{name}-metrics", "-n", namespace)
    for kind in ("clusterrole", "clusterrolebinding"):
        control_plane.kubectl("get", kind, name)
    for kind in ("role", "rolebinding"):
        control_plane.kubectl("get", kind, f"{name}-leader-election", "-n", namespace)
    status = json.loads(control_plane.helm("status", release, "--namespace", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"

    user = operator_user(namespace, release)
    other = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(other)
    assert eventually(lambda: can(control_plane, user, "create", "rayjobs.ray.io", other))
    for verb, resource in (
        ("watch", "finetunejobs.finetune.dev"),
        ("patch", "finetunejobs.finetune.dev:status"),
        ("update", "finetunejobs.finetune.dev:finalizers"),
        ("delete", "configmaps"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("get", "secrets"),
        ("create", "events"),
    ):
        assert can(control_plane, user, verb, resource, other), (verb, resource)
    assert not can(control_plane, user, "watch", "namespaces")  # kopf lists no namespaces when serving all of them
    # The leader-election Lease: its own, in the release namespace only.
    assert eventually(lambda: can(control_plane, user, "update", f"leases.coordination.k8s.io/{name}", namespace))
    assert can(control_plane, user, "create", "leases.coordination.k8s.io", namespace)
    assert not can(control_plane, user, "update", "leases.coordination.k8s.io/kube-scheduler", namespace)
    assert not can(control_plane, user, "update", f"leases.coordination.k8s.io/{name}", other)
    for verb, resource in (
        ("list", "secrets"),
        ("create", "pods"),
        ("create", "finetunejobs.finetune.dev"),
        ("create", "serviceaccounts:token"),
        ("patch", "rayjobs.ray.io:status"),
        ("update", "rayjobs.ray.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("escalate", "roles.rbac.authorization.k8s.io"),
    ):
        assert not can(control_plane, user, verb, resource, other), (verb, resource)

    control_plane.helm("uninstall", release, "--namespace", namespace)
    assert control_plane.kubectl("get", "clusterrole", name, check=False).returncode != 0


def test_operator_can_create_a_jobs_trainer_rbac(control_plane: ControlPlane, namespace: str):
    """Creating a Role needs the creator to hold its permissions (escalation prevention): prove the operator can."""
    release = install(control_plane, namespace, "--set", "executor=local")
    user = operator_user(namespace, release)
    assert eventually(lambda: can(control_plane, user, "create", "serviceaccounts:token", namespace))
    kubeconfig = control_plane.service_account_kubeconfig(namespace, f"{release}-finetune-operator")
    as_operator = dict(kubeconfig=kubeconfig)
    control_plane.kubectl("create", "serviceaccount", "demo-trainer", "-n", namespace, **as_operator)
    control_plane.kubectl("create", "configmap", "demo-sft-report", "-n", namespace, **as_operator)
    control_plane.kubectl(
        "create",
        "role",
        "demo-trainer",
        "--verb=get,patch",
        "--resource=configmaps",
        "--resource-name=demo-sft-report",
        "-n",
        namespace,
        **as_operator,
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "demo-trainer",
        "--role=demo-trainer",
        f"--serviceaccount={namespace}:demo-trainer",
        "-n",
        namespace,
        **as_operator,
    )
    token = control_plane.kubectl("create", "token", "demo-trainer", "-n", namespace, **as_operator).stdout.strip()
    assert token.count(".") == 2
    # A Role wider than the operator's own grants is refused.
    wider = control_plane.kubectl(
        "create", "role", "too-wide", "--verb=list", "--resource=secrets", "-n", namespace, check=False, **as_operator
    )
    assert wider.returncode != 0 and "forbidden" in wider.stderr.lower()


def test_namespaced_install_is_confined_to_its_namespaces(control_plane: ControlPlane, namespace: str):
    watched = [f"w-{uuid.uuid4().hex[:6]}", f"w-{uuid.uuid4().hex[:6]}"]
    for name in watched:
        control_plane.create_namespace(name)
    unwatched = f"u-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(unwatched)
    release = install(control_plane, namespace, "--set", f"watchNamespaces={{{watched[0]},{watched[1]}}}")
    name = f"{release}-finetune-operator"
    for ns in watched:
        control_plane.kubectl("get", "role", name, "-n", ns)
        control_plane.kubectl("get", "rolebinding", name, "-n", ns)
    assert (
        control_plane.kubectl("get", "clusterrole", "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout
        == ""
    )

    user = operator_user(namespace, release)
    assert eventually(lambda: all(can(control_plane, user, "create", "rayjobs.ray.io", ns) for ns in watched))
    assert eventually(lambda: can(control_plane, user, "update", f"leases.coordination.k8s.io/{name}", namespace))
    assert not can(control_plane, user, "create", "leases.coordination.k8s.io", watched[0])
    assert not can(control_plane, user, "list", "customresourcedefinitions.apiextensions.k8s.io")
    assert not can(control_plane, user, "create", "rayjobs.ray.io", unwatched)
    assert not can(control_plane, user, "watch", "finetunejobs.finetune.dev", unwatched)
    assert not can(control_plane, user, "watch", "namespaces")
