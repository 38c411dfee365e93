"""A real local Kubernetes control plane (etcd + kube-apiserver) for tests and development."""

from .binaries import GoNotFoundError, Paths, ensure_binaries
from .controlplane import ApiError, ControlPlane, ControlPlaneError

__all__ = ["ApiError", "ControlPlane", "ControlPlaneError", "GoNotFoundError", "Paths", "ensure_binaries"]
