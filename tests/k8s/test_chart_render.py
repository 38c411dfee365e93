"""The Helm chart renders, lints, and grants exactly the permissions the controller uses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_dev.crdgen import REPO_ROOT

# Needs helm, which the k8s tier builds.
pytestmark = pytest.mark.k8s

CHART = REPO_ROOT / "charts" / "finetune-operator"
NAMESPACE = "ops"

# The operator design's RBAC, as (apiGroup, resource, verb) triples.
NAMESPACED = {
    *(("finetune.dev", "finetunejobs", v) for v in ("get", "list", "watch", "patch", "update", "delete")),
    *(("finetune.dev", "finetunejobs/status", v) for v in ("get", "patch", "update")),
    ("finetune.dev", "finetunejobs/finalizers", "update"),
    *(("ray.io", "rayjobs", v) for v in ("create", "get", "list", "watch", "patch", "delete")),
    *(("", "configmaps", v) for v in ("create", "get", "list", "watch", "patch", "delete")),
    *(("", "serviceaccounts", v) for v in ("create", "get", "delete")),
    *(("rbac.authorization.k8s.io", r, v) for r in ("roles", "rolebindings") for v in ("create", "get", "delete")),
    *(("", "events", v) for v in ("create", "patch", "list")),
    ("", "secrets", "get"),
    ("", "pods", "list"),
    ("", "persistentvolumeclaims", "get"),
    *(("finetune.dev", "finetuneruntimes", v) for v in ("get", "list", "watch")),
}
CLUSTER_RUNTIME_READ = {("finetune.dev", "clusterfinetuneruntimes", v) for v in ("get", "list", "watch")}
CRD_READ = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
TOKEN_CREATE = {("", "serviceaccounts/token", "create")}


@pytest.fixture(scope="module")
def helm() -> Path:
    from finetune_dev import GoNotFoundError, ensure_binaries

    try:
        return ensure_binaries().helm
    except GoNotFoundError as exc:
        pytest.skip(f"no Go toolchain to build helm: {exc}")


def run_helm(helm: Path, *args: str, values: dict[str, Any] | None = None, tmp_path: Path, check: bool = True):
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values or {}))
    env = {
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run([str(helm), *args, "-f", str(values_file)], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = run_helm(helm, "template", "ft", str(CHART), "--namespace", NAMESPACE, values=values, tmp_path=tmp_path)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs, "Deployment")
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    return operator


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


def test_lint_passes_strict(helm: Path, tmp_path: Path):
    run_helm(helm, "lint", "--strict", str(CHART), tmp_path=tmp_path)
    run_helm(
        helm,
        "lint",
        "--strict",
        str(CHART),
        values={"watchNamespaces": ["a", "b"], "executor": "local"},
        tmp_path=tmp_path,
    )


def test_values_yaml_matches_the_schema_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def compare(values: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
        problems = []
        for key, value in values.items():
            child = schema["properties"].get(key)
            if child is None:
                problems.append(f"{path}{key}: not in the schema")
            elif child.get("type") == "object" and "properties" in child:
                problems += compare(value, child, f"{path}{key}.")
            elif "default" in child and child["default"] != value:
                problems.append(f"{path}{key}: values.yaml {value!r} != schema default {child['default']!r}")
        return problems

    assert compare(values, schema, "") == []


def test_default_values_are_cluster_wide(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path)
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    (role,) = by_kind(docs, "ClusterRole")
    assert grants(role) == NAMESPACED | CLUSTER_RUNTIME_READ | CRD_READ
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ft-finetune-operator", "namespace": NAMESPACE}]
    env = env_of(docs)
    assert (env["FINETUNE_LEADER_ELECTION"], env["FINETUNE_LEASE_NAME"]) == ("true", "ft-finetune-operator")
    assert env["FINETUNE_EXECUTOR"] == "kuberay" and env["FINETUNE_NAMESPACES"] == ""
    assert env["FINETUNE_TRAINER_IMAGE"] == "ghcr.io/finetune-operator/trainer:0.1.0"
    assert (env["FINETUNE_IMAGE_PULL_SECRETS"], env["FINETUNE_START_TIMEOUT_SECONDS"]) == ("", "1200")


def test_trainer_pull_secrets_reach_the_operator(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path, {"trainerImagePullSecrets": ["regcred", "mirror"]})
    assert env_of(docs)["FINETUNE_IMAGE_PULL_SECRETS"] == "regcred,mirror"


def test_watch_namespaces_grant_roles_per_namespace(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path, {"watchNamespaces": ["a", "b"]})
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "ft-finetune-operator"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    for role in roles:
        assert grants(role) == NAMESPACED
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "ft-finetune-operator"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["a", "b"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)
    # Nothing cluster-wide: kopf serves the listed namespaces by name, without the CRD and namespace watches.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    assert env_of(docs)["FINETUNE_NAMESPACES"] == "a,b"


def test_token_requests_only_with_the_local_executor(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path, {"executor": "local"})
    (role,) = by_kind(docs, "ClusterRole")
    assert grants(role) == NAMESPACED | CLUSTER_RUNTIME_READ | TOKEN_CREATE | CRD_READ
    assert env_of(docs)["FINETUNE_STATE_DIR"].startswith("/tmp/")


def test_pod_is_non_root_and_read_only(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path)
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    operator = container(docs)
    assert operator["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"]["port"] == "health"
    assert deployment["spec"]["replicas"] == 1


def test_metrics_service_and_optional_service_monitor(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path)
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not by_kind(docs, "ServiceMonitor")
    docs = render(helm, tmp_path, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    docs = render(helm, tmp_path, {"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}})
    assert not by_kind(docs, "Service") and not by_kind(docs, "ServiceMonitor")
    assert env_of(docs)["FINETUNE_METRICS_PORT"] == "0"


def test_leader_election_may_touch_only_its_lease_in_the_operators_namespace(helm: Path, tmp_path: Path):
    for values in ({}, {"watchNamespaces": ["a", "b"]}):
        docs = render(helm, tmp_path, {**values, "leaderElection": {"name": "ops-lease"}})
        (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "ft-finetune-operator-leader-election"]
        assert role["metadata"]["namespace"] == NAMESPACE
        # `create` cannot name the object; reading and renewing can.
        assert role["rules"] == [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": ["ops-lease"],
                "verbs": ["get", "update"],
            },
        ]
        (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
        assert binding["metadata"]["namespace"] == NAMESPACE
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "ft-finetune-operator", "namespace": NAMESPACE}
        ]
        assert env_of(docs)["FINETUNE_LEASE_NAME"] == "ops-lease"
        assert {e["name"] for e in container(docs)["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    (deployment,) = by_kind(render(helm, tmp_path, {"replicas": 3}), "Deployment")
    assert deployment["spec"]["replicas"] == 3


def test_without_leader_election_a_single_replica_and_no_lease_rights(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path, {"leaderElection": {"enabled": False}})
    assert env_of(docs)["FINETUNE_LEADER_ELECTION"] == "false" and "FINETUNE_LEASE_NAME" not in env_of(docs)
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    result = run_helm(
        helm,
        "template",
        "ft",
        str(CHART),
        values={"leaderElection": {"enabled": False}, "replicas": 2},
        tmp_path=tmp_path,
        check=False,
    )
    assert result.returncode != 0 and "replicas > 1 needs leaderElection.enabled" in result.stderr


def test_schema_rejects_unknown_and_mistyped_values(helm: Path, tmp_path: Path):
    for values, complaint in (
        ({"replica": 2}, "replica"),
        ({"executor": "slurm"}, "executor"),
        ({"watchNamespaces": "a"}, "watchNamespaces"),
    ):
        result = run_helm(helm, "template", "ft", str(CHART), values=values, tmp_path=tmp_path, check=False)
        assert result.returncode != 0 and complaint in result.stderr, (values, result.stderr)


def test_crds_ship_with_the_chart(helm: Path, tmp_path: Path):
    result = run_helm(helm, "template", "ft", str(CHART), "--include-crds", tmp_path=tmp_path)
    crds = {
        d["metadata"]["name"]
        for d in yaml.safe_load_all(result.stdout)
        if d and d["kind"] == "CustomResourceDefinition"
    }
    assert crds == {
        "finetunejobs.finetune.dev",
        "finetuneruntimes.finetune.dev",
        "clusterfinetuneruntimes.finetune.dev",
    }


def test_grafana_dashboard_charts_only_metrics_the_operator_exports(helm: Path, tmp_path: Path):
    import re

    from prometheus_client import generate_latest

    from finetune_operator.metrics import OperatorMetrics

    assert by_kind(render(helm, tmp_path), "ConfigMap") == []
    values = {"metrics": {"grafanaDashboard": {"enabled": True}}}
    (configmap,) = by_kind(render(helm, tmp_path, values), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["finetune-operator.json"])
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(dashboard["panels"]) >= 6 and all(expressions)

    metrics = OperatorMetrics()  # every labelled series once, so that each one shows in the exposition
    metrics.reconciles.labels(result="ok").inc()
    metrics.errors.labels(kind="ApiException").inc()
    metrics.stage_attempts.labels(type="sft").inc()
    metrics.events.labels(type="Normal", reason="StageSucceeded").inc()
    metrics.reconcile_seconds.observe(0.1)
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    charted = {name for expr in expressions for name in re.findall(r"\bfinetune_operator_\w+", expr)}
    assert charted and charted <= exported, charted - exported


def test_shipped_runtimes_are_off_by_default_and_valid_when_on(helm: Path, tmp_path: Path):
    from finetune_api.runtime import ClusterFineTuneRuntime

    assert not by_kind(render(helm, tmp_path), "ClusterFineTuneRuntime")
    docs = render(helm, tmp_path, {"runtimes": {"enabled": True, "storageUri": "s3://team-runs/ft"}})
    runtimes = {
        d["metadata"]["name"]: ClusterFineTuneRuntime.model_validate(d) for d in by_kind(docs, "ClusterFineTuneRuntime")
    }
    assert set(runtimes) == {"cpu-tiny", "single-gpu-lora", "multi-gpu-zero3"}
    tiny = runtimes["cpu-tiny"].spec
    assert tiny.defaults.resources.gpus_per_worker == 0 and tiny.policy.max_gpus_per_stage == 0
    assert tiny.defaults.model.source == "pvc://finetune-models/tiny"
    assert runtimes["single-gpu-lora"].spec.policy.max_gpus_per_stage == 1
    zero3 = runtimes["multi-gpu-zero3"].spec
    assert zero3.defaults.deepspeed.zero_stage == 3 and zero3.policy.max_gpus_per_stage == 16
    assert all(r.spec.defaults.storage.uri == "s3://team-runs/ft" for r in runtimes.values())
    assert all("storage" in r.spec.policy.locked_fields for r in runtimes.values())


def test_admission_policies_match_each_runtime_kind_and_can_be_turned_off(helm: Path, tmp_path: Path):
    docs = render(helm, tmp_path)
    policies = {p["spec"]["paramKind"]["kind"]: p for p in by_kind(docs, "ValidatingAdmissionPolicy")}
    assert set(policies) == {"FineTuneRuntime", "ClusterFineTuneRuntime"}
    bindings = {b["spec"]["policyName"]: b for b in by_kind(docs, "ValidatingAdmissionPolicyBinding")}
    for policy in policies.values():
        assert policy["metadata"]["name"].startswith("ft-finetune-operator-")
        binding = bindings[policy["metadata"]["name"]]
        assert binding["spec"]["paramRef"] == {"selector": {}, "parameterNotFoundAction": "Allow"}
        assert binding["spec"]["validationActions"] == ["Deny"]
    off = render(helm, tmp_path, {"admissionPolicy": {"enabled": False}})
    assert not by_kind(off, "ValidatingAdmissionPolicy") and not by_kind(off, "ValidatingAdmissionPolicyBinding")


def test_user_role_creates_jobs_and_reads_runtimes_only(helm: Path, tmp_path: Path):
    assert len(by_kind(render(helm, tmp_path), "ClusterRole")) == 1
    docs = render(helm, tmp_path, {"rbac": {"userRole": True}})
    (user,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == "ft-finetune-operator-user"]
    assert grants(user) == {
        *(("finetune.dev", "finetunejobs", v) for v in ("create", "get", "list", "watch")),
        *(
            ("finetune.dev", r, v)
            for r in ("finetuneruntimes", "clusterfinetuneruntimes")
            for v in ("get", "list", "watch")
        ),
    }


def test_the_kueue_tenancy_example_renders_a_quota_a_queue_and_a_runtime_that_uses_it(helm: Path, tmp_path: Path):
    from finetune_api.runtime import FineTuneRuntime

    docs = [d for d in yaml.safe_load_all((REPO_ROOT / "examples" / "self-serve" / "kueue-team.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"ResourceFlavor", "ClusterQueue", "LocalQueue", "FineTuneRuntime", "RoleBinding"}
    (quota,) = [
        r
        for group in kinds["ClusterQueue"]["spec"]["resourceGroups"]
        for f in group["flavors"]
        for r in f["resources"]
        if r["name"] == "nvidia.com/gpu"
    ]
    runtime = FineTuneRuntime.model_validate(kinds["FineTuneRuntime"])
    queue = kinds["LocalQueue"]
    assert queue["spec"]["clusterQueue"] == kinds["ClusterQueue"]["metadata"]["name"]
    assert runtime.spec.queue_name == queue["metadata"]["name"]
    assert runtime.metadata.namespace == queue["metadata"]["namespace"] == kinds["RoleBinding"]["metadata"]["namespace"]
    # The runtime's GPU limit per stage fits the team's quota.
    assert runtime.spec.policy.max_gpus_per_stage <= int(quota["nominalQuota"])
    # The binding grants the chart's user role, which the chart renders when asked to.
    assert kinds["RoleBinding"]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "finetune-operator-user",
    }
    names = {
        r["metadata"]["name"] for r in by_kind(render(helm, tmp_path, {"rbac": {"userRole": True}}), "ClusterRole")
    }
    assert "ft-finetune-operator-user" in names
