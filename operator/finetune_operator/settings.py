"""Operator settings: defaults < environment (`FINETUNE_<FIELD>`, read by pydantic-settings) < command-line flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from finetune_api.render import PVC_MOUNT_ROOT
from finetune_api.spec import DNS_SUBDOMAIN

EXECUTORS = ("kuberay", "local")
ENV_PREFIX = "FINETUNE_"
# A list in the environment is comma-separated (`FINETUNE_NAMESPACES=ml,research`), not JSON.
CommaList = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    # Other FINETUNE_* variables (the trainer's, the dev tools') are not settings of the operator: ignored.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    executor: Literal["kuberay", "local"] = "kuberay"
    # Namespaces to watch; empty means every namespace (cluster-wide mode).
    namespaces: CommaList = ()
    # 0 disables the endpoint.
    metrics_port: int = 8080
    health_port: int = 8081
    trainer_image: str = "ghcr.io/finetune-operator/trainer:0.1.0"
    # Replicas take turns through a coordination.k8s.io Lease in $POD_NAMESPACE: only its holder acts (leader.py).
    # Off, the operator acts at once and alone: a single local run.
    leader_election: bool = False
    lease_name: str = Field("finetune-operator", min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    # client-go's defaults: a standby takes over lease_seconds after the holder's last renewal; the holder renews
    # every lease_retry_seconds and stops acting once no renewal succeeded for lease_renew_deadline_seconds.
    lease_seconds: int = 15
    lease_renew_deadline_seconds: float = 10.0
    lease_retry_seconds: float = 2.0
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
    image_pull_secrets: CommaList = ()
    # An attempt whose Ray cluster is still not up this long after KubeRay began creating it fails, naming the pods'
    # own reasons (Unschedulable, ImagePullBackOff, ...). Time queued in Kueue does not count. 0 disables it.
    start_timeout_seconds: float = 1200.0
    head_cpu: str = "1"
    head_memory: str = "2Gi"
    # Local executor: per-attempt directories (log, pid, exit code, kubeconfig) live here.
    state_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "state" / "finetune-operator")
    trainer_python: str = sys.executable
    local_poll_seconds: float = 2.0
    local_token_seconds: int = 86400
    # Where `pvc://<claim>/...` volumes are reachable from the operator (for retainOnDelete: false cleanup).
    pvc_root: Path = Path(PVC_MOUNT_ROOT)

    @field_validator("namespaces", "image_pull_secrets", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return tuple(part.strip() for part in value.split(",") if part.strip()) if isinstance(value, str) else value

    @field_validator("kubeconfig", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _holder_stops_before_the_lease_expires(self) -> Settings:
        # client-go's NewLeaderElector checks the same: a holder that cannot renew gives up before a standby may take
        # over, and tries at least once before it gives up.
        if not self.lease_seconds > self.lease_renew_deadline_seconds > self.lease_retry_seconds > 0:
            raise ValueError(
                "lease timings need lease_seconds > lease_renew_deadline_seconds > lease_retry_seconds > 0"
            )
        return self

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def replace(self, **changes: Any) -> Settings:
        return self.model_copy(update=changes)


def from_env(**overrides: Any) -> Settings:
    """Settings from `FINETUNE_*` variables, then explicit overrides (flags); None overrides are ignored.

    A bad value raises ValueError naming where it came from: `FINETUNE_METRICS_PORT='eighty': ...` or `--executor`.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            where = f"--{name.replace('_', '-')}" if name in given else f"{ENV_PREFIX}{name.upper()}"
            value = f"={error['input']!r}" if name and not isinstance(error["input"], dict) else ""
            problems.append(f"{where}{value}: {error['msg']}" if name else error["msg"].removeprefix("Value error, "))
        raise ValueError("; ".join(problems)) from None
