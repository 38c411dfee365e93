"""`helm install` with the shipped runtimes and the user role, against a real API server: the runtimes install, a
team's users may create FineTuneJobs and read runtimes in their namespace and nothing else, and the chart's admission
policy refuses a job over its runtime's limits."""

from __future__ import annotations

import json
import time
import uuid

from finetune_dev import ControlPlane
from finetune_dev.binaries import REPO_ROOT

CHART = REPO_ROOT / "charts" / "finetune-operator"


def can(cp: ControlPlane, user: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    scope = ["--namespace", namespace] if namespace else []
    resource, _, subresource = resource.partition(":")
    extra = [f"--subresource={subresource}"] if subresource else []
    result = cp.kubectl("auth", "can-i", verb, resource, *extra, "--as", user, *scope, check=False)
    return result.stdout.strip() == "yes"


def eventually(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_runtimes_and_user_role_install_and_grant_only_what_users_need(control_plane: ControlPlane, namespace: str):
    release = f"ft-{uuid.uuid4().hex[:6]}"
    control_plane.helm(
        "install", release, str(CHART), "--namespace", namespace, "--wait=false",
        "--set", "rbac.userRole=true", "--set", "runtimes.enabled=true",
    )  # fmt: skip
    listed = json.loads(control_plane.kubectl("get", "clusterfinetuneruntimes", "-o", "json").stdout)
    assert {"cpu-tiny", "single-gpu-lora", "multi-gpu-zero3"} <= {r["metadata"]["name"] for r in listed["items"]}

    team = f"team-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(team)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "finetune-users", "namespace": team},
        "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}],
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": f"{release}-finetune-operator-user",
        },
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(binding))
    assert eventually(lambda: can(control_plane, "alice", "create", "finetunejobs.finetune.dev", team))
    for verb, resource in (
        ("get", "finetunejobs.finetune.dev"),
        ("watch", "finetunejobs.finetune.dev"),
        ("get", "finetuneruntimes.finetune.dev"),
        ("list", "clusterfinetuneruntimes.finetune.dev"),
    ):
        assert can(control_plane, "alice", verb, resource, team), (verb, resource)
    for verb, resource in (
        ("update", "finetunejobs.finetune.dev"),
        ("delete", "finetunejobs.finetune.dev"),
        ("patch", "finetunejobs.finetune.dev:status"),
        ("create", "finetuneruntimes.finetune.dev"),
        ("update", "clusterfinetuneruntimes.finetune.dev"),
        ("get", "secrets"),
        ("create", "rayjobs.ray.io"),
        ("create", "pods"),
        ("get", "configmaps"),
    ):
        assert not can(control_plane, "alice", verb, resource, team), (verb, resource)
    # Only in the team's namespace.
    assert not can(control_plane, "alice", "create", "finetunejobs.finetune.dev", namespace)

    # The shipped policy holds cpu-tiny's limits at create time.
    job = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "too-many-workers"},
        "spec": {
            "runtimeRef": {"kind": "ClusterFineTuneRuntime", "name": "cpu-tiny"},
            "resources": {"workers": 4},
            "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/chat.jsonl"}}],
        },
    }

    def refused() -> bool:
        result = control_plane.kubectl(
            "create", "--dry-run=server", "--as", "alice", "-n", team, "-f", "-", input=json.dumps(job), check=False
        )
        return "spec.resources.workers: 4 is more than the runtime's policy.maxWorkers 2" in result.stderr

    assert eventually(refused, timeout=60)
    job["spec"]["resources"]["workers"] = 2
    created = control_plane.kubectl(
        "create", "--as", "alice", "-n", team, "-f", "-", input=json.dumps(job), check=False
    )
    assert created.returncode == 0, created.stderr
