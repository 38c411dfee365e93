"""Operator settings: defaults < environment (`FINETUNE_<FIELD>`) < command-line flags."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.render import PVC_MOUNT_ROOT

EXECUTORS = ("kuberay", "local")
ENV_PREFIX = "FINETUNE_"


@dataclass(frozen=True)
class Settings:
    executor: str = "kuberay"
    # Namespaces to watch; empty means every namespace (cluster-wide mode).
    namespaces: tuple[str, ...] = ()
    # 0 disables the endpoint.
    metrics_port: int = 8080
    health_port: int = 8081
    trainer_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    # kopf peering object name; None with standalone=False means kopf's default peering.
    peering: str | None = None
    standalone: bool = False
    # None: in-cluster ServiceAccount, else $KUBECONFIG / ~/.kube/config.
    kubeconfig: str | None = None
    # Delay before retry n is retry_base_seconds * 2**(n-1), capped at retry_max_seconds.
    retry_base_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    # How often a missing Secret is looked for again.
    secret_recheck_seconds: float = 15.0
    # Reconcile passes (and API connections) running at once.
    api_workers: int = 32
    # Every job is reconciled at least this often, even without watch events.
    resync_seconds: float = 60.0
    # RayJob `ttlSecondsAfterFinished`: how long a finished stage's Ray cluster stays for log inspection.
    rayjob_ttl_seconds: int = 60
    # Image pull secrets of every stage's Ray pods (a job may add its own with `spec.resources.imagePullSecrets`).
    image_pull_secrets: tuple[str, ...] = ()
    # An attempt whose Ray cluster is still not up this long after KubeRay began creating it fails, naming the pods'
    # own reasons (Unschedulable, ImagePullBackOff, ...). Time queued in Kueue does not count. 0 disables it.
    start_timeout_seconds: float = 1200.0
    head_cpu: str = "1"
    head_memory: str = "2Gi"
    # Local executor: per-attempt directories (log, pid, exit code, kubeconfig) live here.
    state_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "state" / "finetune-operator")
    trainer_python: str = sys.executable
    local_poll_seconds: float = 2.0
    local_token_seconds: int = 86400
    # Where `pvc://<claim>/...` volumes are reachable from the operator (for retainOnDelete: false cleanup).
    pvc_root: Path = Path(PVC_MOUNT_ROOT)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.standalone and self.peering:
            raise ValueError("--peering and --standalone exclude each other")

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, kind: Any, text: str) -> Any:
    kind = str(kind)
    try:
        if "tuple" in kind:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind.startswith("bool"):
            if text.lower() not in ("1", "true", "yes", "0", "false", "no", ""):
                raise ValueError("expected true or false")
            return text.lower() in ("1", "true", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("Path"):
            return Path(text)
        return text or None if "None" in kind else text
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r}: {exc}") from None


def from_env(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `FINETUNE_*` variables, then explicit overrides (flags); None overrides are ignored."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(Settings):
        text = environ.get(ENV_PREFIX + spec.name.upper())
        if text is not None:
            values[spec.name] = _coerce(spec.name, spec.type, text)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
