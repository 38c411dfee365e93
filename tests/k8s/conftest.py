"""A real etcd + kube-apiserver for the `k8s` tests, started once per test session."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from finetune_dev import ControlPlane, GoNotFoundError, ensure_binaries

K8S_TESTS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if K8S_TESTS_DIR in item.path.parents:
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def control_plane():
    try:
        ensure_binaries()
    except GoNotFoundError as exc:
        pytest.skip(f"no Go toolchain to build the local control plane: {exc}")
    with ControlPlane() as cluster:
        yield cluster


@pytest.fixture
def namespace(control_plane: ControlPlane) -> str:
    """A fresh namespace per test (namespaces are never reclaimed: no controller-manager runs)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    return name
