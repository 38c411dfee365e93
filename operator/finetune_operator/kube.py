"""A small synchronous Kubernetes API layer over the official client: plain dicts in and out.

Requests go through `kubernetes.dynamic.DynamicClient.request`, the client's public entry point for raw API paths:
its signature has stayed the same from client 33 to 37 while the generated `ApiClient.call_api` underneath changed.
Run from the async handlers through `asyncio.to_thread`. Create-if-absent tolerates 409 so that every child create
is idempotent; status is written through the status subresource with a JSON merge patch.
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from finetune_api.runtime import CLUSTER_RUNTIME_KIND, CLUSTER_RUNTIME_PLURAL, RUNTIME_KIND, RUNTIME_PLURAL
from finetune_api.spec import GROUP, PLURAL, VERSION

# (apiVersion, kind) -> (API prefix, plural) for every kind the operator reads or writes.
_RESOURCES = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("v1", "Secret"): ("/api/v1", "secrets"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),
    ("coordination.k8s.io/v1", "Lease"): ("/apis/coordination.k8s.io/v1", "leases"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    ("ray.io/v1", "RayJob"): ("/apis/ray.io/v1", "rayjobs"),
    (f"{GROUP}/{VERSION}", "FineTuneJob"): (f"/apis/{GROUP}/{VERSION}", PLURAL),
    (f"{GROUP}/{VERSION}", RUNTIME_KIND): (f"/apis/{GROUP}/{VERSION}", RUNTIME_PLURAL),
    (f"{GROUP}/{VERSION}", CLUSTER_RUNTIME_KIND): (f"/apis/{GROUP}/{VERSION}", CLUSTER_RUNTIME_PLURAL),
}
RAYJOB = ("ray.io/v1", "RayJob")
CONFIGMAP = ("v1", "ConfigMap")
POD = ("v1", "Pod")
PVC = ("v1", "PersistentVolumeClaim")
LEASE = ("coordination.k8s.io/v1", "Lease")
FINETUNEJOB = (f"{GROUP}/{VERSION}", "FineTuneJob")
RUNTIME = (f"{GROUP}/{VERSION}", RUNTIME_KIND)
CLUSTER_RUNTIME = (f"{GROUP}/{VERSION}", CLUSTER_RUNTIME_KIND)
MERGE_PATCH = "application/merge-patch+json"
CREDENTIAL_REFRESH_SECONDS = 10.0


def load_configuration(kubeconfig: str | None) -> kubernetes.client.Configuration:
    """In-cluster ServiceAccount credentials when no kubeconfig is given and they exist, else the kubeconfig."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return configuration
        except kubernetes.config.ConfigException:
            pass
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


def is_status(exc: ApiException, *codes: int) -> bool:
    return isinstance(exc, ApiException) and exc.status in codes


class _NoDiscovery:
    """Every path here is built from `_RESOURCES`, so the dynamic client's API discovery (3 GETs and a cache file
    under /tmp at construction) is never needed."""

    def __init__(self, client: DynamicClient, cache_file: str | None):
        del client, cache_file


def throttle_credential_refresh(configuration: kubernetes.client.Configuration, seconds: float) -> None:
    """Renew credentials at most every `seconds`: the kubeconfig loader's hook re-applies the whole kubeconfig before
    every request (kube_config.py `_set_config`: setting `host` re-reads the proxy settings from the environment), a
    fixed cost per request. Tokens live for minutes or more, so renewing every few seconds still renews in time."""
    hooks = [configuration.refresh_api_key_hook]
    if hooks[0] is None:
        return
    renewed = [-math.inf]

    def refresh(config: kubernetes.client.Configuration) -> None:
        now = time.monotonic()
        if now - renewed[0] >= seconds:
            renewed[0] = now
            hooks[0](config)
            # The loader's hook installs itself again (`_set_config`): keep its newest self, and this in front of it.
            if config.refresh_api_key_hook is not refresh:
                hooks[0] = config.refresh_api_key_hook
                config.refresh_api_key_hook = refresh

    configuration.refresh_api_key_hook = refresh


class Kube:
    def __init__(self, configuration: kubernetes.client.Configuration):
        self.configuration = configuration
        throttle_credential_refresh(configuration, CREDENTIAL_REFRESH_SECONDS)
        self.client = kubernetes.client.ApiClient(configuration)
        self.dynamic = DynamicClient(self.client, discoverer=_NoDiscovery)

    @classmethod
    def connect(cls, kubeconfig: str | None, connections: int | None = None) -> Kube:
        configuration = load_configuration(kubeconfig)
        if connections:
            configuration.connection_pool_maxsize = connections
        return cls(configuration)

    def close(self) -> None:
        self.client.close()

    # -- raw requests -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, Any]] | None = None,
        timeout: float = 30,
        parse: bool = True,
    ) -> dict[str, Any]:
        """The response body as a dict; with `parse` False, {} (the object a write returns is often all that the
        operator would decode, for nothing)."""
        # Errors arrive as the dynamic client's ApiException subclasses (NotFoundError, ConflictError, ...).
        response = self.dynamic.request(
            method,
            path,
            body=body,
            query_params=list(query or []),
            content_type=content_type,
            header_params={"Accept": "application/json"},
            serialize=False,
            _request_timeout=timeout,
        )
        # Read whole either way: an unread body keeps its connection out of the pool (a TLS handshake per request).
        data = response.data
        return json.loads(data or b"{}") if parse else {}

    @staticmethod
    def path(
        kind: tuple[str, str], namespace: str | None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The object's API path; `namespace` None for a cluster-scoped kind."""
        prefix, plural = _RESOURCES[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    # -- generic verbs ----------------------------------------------------------------------------

    def get(self, kind: tuple[str, str], namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def exists(self, kind: tuple[str, str], namespace: str, name: str) -> bool:
        return self.get(kind, namespace, name) is not None

    def create(self, manifest: dict[str, Any], parse: bool = True) -> dict[str, Any]:
        kind = (manifest["apiVersion"], manifest["kind"])
        return self.request("POST", self.path(kind, manifest["metadata"]["namespace"]), manifest, parse=parse)

    def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Create the object unless one of that name exists; True when this call created it."""
        try:
            self.create(manifest, parse=False)
            return True
        except ApiException as exc:
            if is_status(exc, 409):
                return False
            raise

    def patch(
        self, kind: tuple[str, str], namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None
    ) -> None:
        self.request(
            "PATCH", self.path(kind, namespace, name, subresource), patch, content_type=MERGE_PATCH, parse=False
        )

    def delete(self, kind: tuple[str, str], namespace: str, name: str) -> bool:
        """Delete one object; False when it was already gone."""
        try:
            self.request("DELETE", self.path(kind, namespace, name), {"propagationPolicy": "Background"}, parse=False)
            return True
        except ApiException as exc:
            if is_status(exc, 404):
                return False
            raise

    def list(self, kind: tuple[str, str], namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.request("GET", self.path(kind, namespace), query=[("labelSelector", selector)]).get("items", [])

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        path = self.path(("v1", "Event"), namespace)
        return self.request("GET", path, query=[("fieldSelector", field_selector)]).get("items", [])

    # -- specific calls ---------------------------------------------------------------------------

    def patch_job_status(self, namespace: str, name: str, status_patch: dict[str, Any]) -> None:
        self.patch(FINETUNEJOB, namespace, name, {"status": status_patch}, subresource="status")

    def service_account_token(self, namespace: str, name: str, seconds: int) -> str:
        """A TokenRequest token for ServiceAccount namespace/name (what a Pod's projected token would be)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        path = self.path(("v1", "ServiceAccount"), namespace, name, "token")
        return self.request("POST", path, body)["status"]["token"]

    def kubeconfig_for_token(self, token: str, path: Path, namespace: str) -> Path:
        """A kubeconfig for the same API server authenticating with `token` (written 0600)."""
        cluster: dict[str, Any] = {"server": self.configuration.host}
        if self.configuration.ssl_ca_cert:
            # Inline: the client's CA file may be a temporary file that goes away with the operator process.
            cluster["certificate-authority-data"] = base64.b64encode(
                Path(self.configuration.ssl_ca_cert).read_bytes()
            ).decode()
        if not self.configuration.verify_ssl:
            cluster["insecure-skip-tls-verify"] = True
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "trainer",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": "trainer", "user": {"token": token}}],
            "contexts": [
                {"name": "trainer", "context": {"cluster": "cluster", "user": "trainer", "namespace": namespace}}
            ],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(config))
        return path
