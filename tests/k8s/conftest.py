"""A real etcd + kube-apiserver for the `k8s` tests, started once per test session.

Tests marked `neighbours("kube-scheduler", "kwok", ...)` get a second control plane that also runs those
neighbours (see finetune_dev.controlplane.COMPONENTS) through the `cluster` fixture; tests asking for the same
set share it, so the plain `control_plane` fixture, and the fast tests on it, never pay for them.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from finetune_dev import ControlPlane, GoNotFoundError, ensure_binaries

K8S_TESTS_DIR = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "neighbours(*components): the `cluster` fixture runs these beside the apiserver")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if K8S_TESTS_DIR in item.path.parents:
            item.add_marker(pytest.mark.k8s)


def _require_go() -> None:
    try:
        ensure_binaries()
    except GoNotFoundError as exc:
        pytest.skip(f"no Go toolchain to build the local control plane: {exc}")


@pytest.fixture(scope="session")
def control_plane():
    _require_go()
    with ControlPlane() as cluster:
        yield cluster


@pytest.fixture
def namespace(control_plane: ControlPlane) -> str:
    """A fresh namespace per test (namespaces are never reclaimed: no controller-manager runs)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.create_namespace(name)
    return name


@pytest.fixture(scope="session")
def _neighbour_planes():
    planes: dict[tuple[str, ...], ControlPlane] = {}
    yield planes
    for plane in planes.values():
        plane.stop()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, _neighbour_planes: dict) -> ControlPlane:
    """A control plane running the neighbours named by the test's `neighbours` marker.

    One such cluster lives at a time: asking for another set stops the previous one (each holds an apiserver).
    """
    marker = request.node.get_closest_marker("neighbours")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses `cluster` without a neighbours(...) marker")
    components = tuple(sorted(marker.args))
    if components not in _neighbour_planes:
        _require_go()
        for plane in _neighbour_planes.values():
            plane.stop()
        _neighbour_planes.clear()
        _neighbour_planes[components] = ControlPlane(components=components).start()
    return _neighbour_planes[components]
