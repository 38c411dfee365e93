"""The operator runs with the lowest and the highest kubernetes client that pyproject.toml allows.

Each bound gets its own environment: the lock's operator dependencies, then the client resolved to the lowest or the
highest version inside the declared range (uv's `lowest-direct` / `highest` resolution), cached by the lock's hash.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from finetune_dev.binaries import cache_dir
from finetune_dev.testing import REPO_ROOT, OperatorProcess, install_chart_rbac
from finetune_operator.kube import FINETUNEJOB, RAYJOB, Kube

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def client_requirement() -> str:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return next(dep for dep in extras["operator"] if dep.startswith("kubernetes"))


def uv() -> str:
    found = shutil.which("uv") or next(iter(sorted(cache_dir().glob("uv-*/bin/uv"))), None)
    if found is None:
        pytest.skip("uv is not installed (make installs it under ~/.cache/finetune-operator)")
    return str(found)


def bound_environment(resolution: str) -> tuple[Path, str]:
    """(python, installed client version) of an environment with the client at the `resolution` bound."""
    lock = hashlib.sha256((REPO_ROOT / "uv.lock").read_bytes() + client_requirement().encode()).hexdigest()[:12]
    root = cache_dir() / "client-bounds" / f"{resolution}-{lock}"
    python = root / "bin" / "python"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        requirements = root.parent / f"{resolution}-{lock}.txt"
        requirements.parent.mkdir(parents=True, exist_ok=True)
        exported = subprocess.run(
            [uv(), "export", "--frozen", "--no-dev", "--extra", "operator", "--no-emit-project", "--no-hashes"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        requirements.write_text("".join(line + "\n" for line in exported.splitlines() if "kubernetes==" not in line))
        subprocess.run([uv(), "venv", "-q", str(root)], check=True)
        subprocess.run([uv(), "pip", "install", "-q", "--python", str(python), "-r", str(requirements)], check=True)
        subprocess.run(
            [uv(), "pip", "install", "-q", "--python", str(python), "--resolution", resolution, client_requirement()],
            check=True,
        )
        (root / ".complete").touch()
    version = subprocess.run(
        [str(python), "-c", "import kubernetes; print(kubernetes.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return python, version


@pytest.mark.parametrize(("resolution", "major"), [("lowest-direct", "33"), ("highest", "37")])
def test_operator_reconciles_with_the_client_bound(control_plane, namespace, tmp_path, resolution, major):
    python, version = bound_environment(resolution)
    assert version.split(".")[0] == major, f"{client_requirement()} resolved to {version} for {resolution}"

    kubeconfig = install_chart_rbac(control_plane, f"op-{namespace}", namespace, "kuberay", [namespace])
    admin = Kube.connect(str(control_plane.kubeconfig))
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bounds", "namespace": namespace},
        "spec": {
            "model": {"source": "s3://models/base"},
            # retainOnDelete: false makes the operator hold a finalizer: its metadata patch and deletes are exercised.
            "storage": {"uri": "s3://runs/bounds", "retainOnDelete": False},
            "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "s3://data/instruct.jsonl"}}],
        },
    }
    with OperatorProcess(kubeconfig, tmp_path / "operator.log", "kuberay", (namespace,), python=str(python)) as op:
        admin.create(manifest)
        deadline = time.monotonic() + 60
        # Create (ConfigMap, ServiceAccount, Role, RoleBinding, RayJob), get and status patch all went through.
        while not (
            admin.list(RAYJOB, namespace, "finetune.dev/job=bounds")
            and (admin.get(FINETUNEJOB, namespace, "bounds") or {}).get("status", {}).get("phase") == "Running"
        ):
            assert time.monotonic() < deadline, f"client {version}: no RayJob/status\n{op.log_tail()}"
            time.sleep(0.5)
        # Delete: the finalizer goes only after the operator deleted the children.
        admin.delete(FINETUNEJOB, namespace, "bounds")
        while admin.get(FINETUNEJOB, namespace, "bounds") is not None:
            assert time.monotonic() < deadline + 60, f"client {version}: job not finalized\n{op.log_tail()}"
            time.sleep(0.5)
        assert admin.list(RAYJOB, namespace, "finetune.dev/job=bounds") == []
        assert "Traceback" not in op.log_tail()
