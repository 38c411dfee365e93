"""Run etcd + kube-apiserver on loopback: a real API server with RBAC, CRDs and TokenRequest.

By default nothing else runs: no controller-manager, scheduler or kubelet, so Pods never run,
garbage collection of owned objects does not happen and deleted namespaces stay Terminating.
What the operator needs (CRDs, status subresources, RBAC, watches, server-side validation) is the
real thing.

`components` adds the real neighbours, each built from its pinned Go module on first use:
kube-controller-manager (garbage collection, namespaces, Jobs, node lifecycle), kube-scheduler,
KWOK (fake nodes whose Pods become Running and Ready without a kubelet), the KubeRay operator and
Kueue (its webhooks served on loopback with a certificate from this cluster's CA).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .binaries import KUEUE_METRICS_CERT_ENV, REPO_ROOT, ComponentPaths, Paths, ensure_binaries, ensure_component

SERVICE_CIDR = "10.0.0.0/24"
# The first address of SERVICE_CIDR: the ClusterIP of the `kubernetes` Service, which in-cluster
# clients dial, so it must be in the serving certificate.
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
_LOG_TAIL_LINES = 60
# Everything start() writes into the state directory.
_STATE_ENTRIES = ("pki", "etcd", "logs", "apiserver-certs", "helm", "kubeconfigs", "kubeconfig", "components")
# The neighbours a cluster can run, in the order they start.
COMPONENTS = ("kube-controller-manager", "kube-scheduler", "kwok", "kuberay-operator", "kueue")
# The kube-controller-manager loops the neighbours rely on (names from k8s.io/kubernetes
# cmd/kube-controller-manager/names/controller_names.go): owner-reference garbage collection,
# namespace deletion, `default` ServiceAccounts, Jobs (KubeRay's submitter), Endpoints (what the
# apiserver's service proxy dials: pkg/registry/core/service/storage ResourceLocation) and
# EndpointSlices, each namespace's `kube-root-ca.crt` (what a Pod's projected token volume
# carries), PersistentVolumeClaim binding, and node lifecycle (it lifts the not-ready taint the
# apiserver puts on every new Node).
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "job-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "root-ca-certificate-publisher-controller",
    "persistentvolume-binder-controller",
    "node-lifecycle-controller",
)
GPU_RESOURCE = "nvidia.com/gpu"
KUEUE_NAMESPACE = "kueue-system"
# Kueue's RayJob and RayCluster integrations only (config API: apis/config/v1beta2/configuration_types.go).
KUEUE_FRAMEWORKS = ("ray.io/rayjob", "ray.io/raycluster")
KUEUE_WEBHOOK_PREFIX = "finetune-dev-kueue"


class ControlPlaneError(RuntimeError):
    """The control plane failed to start or a command against it failed."""


class ApiError(ControlPlaneError):
    """The apiserver answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str):
        super().__init__(f"{method} {path}: HTTP {status}: {body}")
        self.status = status


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call exited non-zero; unlike CalledProcessError, str() shows its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def default_crds(binaries: Paths) -> list[Path]:
    """KubeRay's CRDs plus every CRD the repository ships under crds/."""
    repo_crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    return [*binaries.kuberay_crds, *repo_crds]


def kueue_webhook_configurations(manifests: Path, base_url: str, ca_bundle: bytes) -> list[dict]:
    """Kueue's own webhook configurations (config/components/webhook/manifests.yaml), cut down to the webhooks
    for Kueue's API and the RayJob/RayCluster integrations, and pointed at `base_url` instead of a Service.

    Webhooks of the other integrations are left out: Kueue does not serve them here, and with their
    `failurePolicy: Fail` every batch Job or Pod create (KubeRay's submitter among them) would be refused.
    """
    kept_groups = {"kueue.x-k8s.io"}
    kept_ray = {"rayjobs", "rayclusters"}
    configurations = []
    for document in yaml.safe_load_all(manifests.read_text()):
        if not document:
            continue
        webhooks = []
        for webhook in document.get("webhooks", []):
            rules = webhook.get("rules", [])
            groups = {group for rule in rules for group in rule.get("apiGroups", [])}
            resources = {resource for rule in rules for resource in rule.get("resources", [])}
            if not (groups <= kept_groups or (groups == {"ray.io"} and resources <= kept_ray)):
                continue
            path = webhook["clientConfig"]["service"]["path"]
            webhook["clientConfig"] = {"url": base_url + path, "caBundle": base64.b64encode(ca_bundle).decode()}
            webhooks.append(webhook)
        name = f"{KUEUE_WEBHOOK_PREFIX}-{document['kind'].removesuffix('WebhookConfiguration').lower()}"
        configurations.append(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": document["kind"],
                "metadata": {"name": name},
                "webhooks": webhooks,
            }
        )
    return configurations


def _unverified_tls() -> ssl.SSLContext:
    # Only for /healthz of components serving a certificate they generated themselves.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_UNVERIFIED_TLS = _unverified_tls()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_with_parent() -> None:
    """Runs in the child before exec: die with the parent, so a SIGKILLed test run leaves no
    stray etcd/apiserver behind. (PR_SET_PDEATHSIG fires when the spawning thread exits.)"""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class _Pki:
    """A throwaway CA with the serving, admin-client and service-account keys signed by it."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.ca_cert = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.serving_cert = directory / "apiserver.crt"
        self.serving_key = directory / "apiserver.key"
        self.admin_cert = directory / "admin.crt"
        self.admin_key = directory / "admin.key"
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"

    def generate(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "finetune-devcluster-ca")])
        ca = (
            self._builder(ca_name, ca_name, ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self._write_cert(self.ca_cert, ca)
        self._write_key(self.ca_key, ca_key)

        sans = [
            x509.DNSName(n)
            for n in (
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            )
        ] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", KUBERNETES_SERVICE_IP)]
        self._issue(
            ca,
            ca_key,
            self.serving_cert,
            self.serving_key,
            "kube-apiserver",
            None,
            ExtendedKeyUsageOID.SERVER_AUTH,
            sans,
        )
        # The system:masters group is what makes this client a cluster admin under RBAC.
        self._issue(
            ca,
            ca_key,
            self.admin_cert,
            self.admin_key,
            "finetune-dev-admin",
            "system:masters",
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [],
        )

        sa_key = ec.generate_private_key(ec.SECP256R1())
        self._write_key(self.sa_key, sa_key)
        self.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def issue_loopback_serving(self, directory: Path, name: str) -> tuple[Path, Path]:
        """A serving certificate for 127.0.0.1 signed by this CA, as `tls.crt`/`tls.key` (controller-runtime's names)."""
        directory.mkdir(parents=True, exist_ok=True)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        cert, key = directory / "tls.crt", directory / "tls.key"
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        self._issue(ca, ca_key, cert, key, name, None, ExtendedKeyUsageOID.SERVER_AUTH, sans)
        return cert, key

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
        )

    def _issue(self, ca, ca_key, cert_path, key_path, common_name, group, usage, sans) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if group:
            attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, group))
        builder = (
            self._builder(x509.Name(attributes), ca.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        self._write_cert(cert_path, builder.sign(ca_key, hashes.SHA256()))
        self._write_key(key_path, key)

    @staticmethod
    def _write_cert(path: Path, cert: x509.Certificate) -> None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _write_key(path: Path, key) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)


class ControlPlane:
    """etcd + kube-apiserver on free loopback ports, with an admin kubeconfig and CRDs installed.

    Use as a context manager, or call start() and stop(). With `state_dir=None` everything lives
    in a temporary directory removed on stop(); with a directory, its contents are replaced on
    start() (each start is a fresh, empty cluster) and left in place on stop() for the logs.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        crds: list[Path] | None = None,
        startup_timeout: float = 60.0,
        components: tuple[str, ...] | list[str] = (),
    ):
        self._owns_dir = state_dir is None
        self.dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="finetune-k8s-"))
        self._crds = crds
        self._startup_timeout = startup_timeout
        self._pki = _Pki(self.dir / "pki")
        self.log_dir = self.dir / "logs"
        self.kubeconfig = self.dir / "kubeconfig"
        self.binaries: Paths | None = None
        self.url = ""
        self._admin_tls: ssl.SSLContext | None = None
        self._processes: list[tuple[str, subprocess.Popen]] = []
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown components {unknown}; expected some of {', '.join(COMPONENTS)}")
        self.components = tuple(name for name in COMPONENTS if name in components)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        try:
            self.binaries = ensure_binaries()
            self._prepare_dir()
            self._pki.generate()
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._write_kubeconfig(
                self.kubeconfig,
                {
                    "client-certificate-data": self._b64(self._pki.admin_cert),
                    "client-key-data": self._b64(self._pki.admin_key),
                },
            )
            # No controller-manager runs to create it, and the ServiceAccount admission
            # plugin rejects Pods in a namespace whose `default` ServiceAccount is missing.
            self.create_namespace("default")
            self.install_crds(self._crds if self._crds is not None else default_crds(self.binaries))
            for name in self.components:
                self._start_component(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # The apiserver goes first so it does not spend its shutdown retrying a dead etcd.
        for _, proc in reversed(self._processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._processes.clear()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def ca_cert(self) -> Path:
        """The cluster CA's certificate (what `kube-root-ca.crt` carries)."""
        return self._pki.ca_cert

    def raise_if_exited(self) -> None:
        """Raise ControlPlaneError, with its log, if etcd or the apiserver has died."""
        for name, proc in self._processes:
            if proc.poll() is not None:
                self._fail(f"{name} exited with code {proc.returncode}", name)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _prepare_dir(self) -> None:
        # Only what a previous start wrote: a mistyped --dir must not lose anyone's files.
        for entry in _STATE_ENTRIES:
            path = self.dir / entry
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=dict(os.environ, **env) if env else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches only us, and stop() shuts the
                # components down in order.
                start_new_session=True,
                preexec_fn=_kill_with_parent if sys.platform == "linux" else None,
            )
        self._processes.append((name, proc))
        return proc

    def _start_etcd(self) -> str:
        client_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        proc = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=devcluster",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=devcluster={peer_url}",
                # Throwaway data: skipping fsync makes every write several times faster.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait_ready("etcd", proc, lambda: self._http_ok(f"{client_url}/health"))
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        port = free_port()
        pki = self._pki
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # The `kubernetes` Service's Endpoints may not point at loopback, and nothing here
                # dials it: skip reconciling them instead of logging a validation error every 10s.
                "--endpoint-reconciler-type=none",
                "--v=1",
            ],
        )
        self.url = f"https://127.0.0.1:{port}"
        self._admin_tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        self._admin_tls.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        self._wait_ready("kube-apiserver", proc, lambda: self._http_ok(f"{self.url}/readyz", self._admin_tls))

    @staticmethod
    def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, name: str, proc: subprocess.Popen, ready) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while not ready():
            if proc.poll() is not None:
                self._fail(f"{name} exited with code {proc.returncode} during startup", name)
            if time.monotonic() > deadline:
                self._fail(f"{name} not ready after {self._startup_timeout:.0f}s", name)
            time.sleep(0.2)

    def _fail(self, message: str, name: str) -> None:
        log = self.log_dir / f"{name}.log"
        raise ControlPlaneError(f"{message}; last lines of {log}:\n{_tail(log)}")

    # -- neighbours --------------------------------------------------------------------------
    # Every neighbour authenticates as cluster admin: their own RBAC is not what the tests check.

    def _start_component(self, name: str) -> None:
        started = time.monotonic()
        paths = ensure_component(name)
        {
            "kube-controller-manager": self._start_controller_manager,
            "kube-scheduler": self._start_scheduler,
            "kwok": self._start_kwok,
            "kuberay-operator": self._start_kuberay,
            "kueue": self._start_kueue,
        }[name](paths)
        print(f"[devcluster] {name} ready in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)

    def _secure_component_args(self, name: str) -> tuple[list[str], str]:
        """Flags for a Kubernetes component serving /healthz on a free loopback port, and that URL."""
        port = free_port()
        args = [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.dir / 'components' / name}",
            "--v=1",
        ]
        return args, f"https://127.0.0.1:{port}/healthz"

    def _start_controller_manager(self, paths: ComponentPaths) -> None:
        args, healthz = self._secure_component_args("kube-controller-manager")
        proc = self._spawn(
            "kube-controller-manager",
            [
                str(paths.binary),
                *args,
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--root-ca-file={self._pki.ca_cert}",
                # The default 20 requests/s has the garbage collector take minutes over a few thousand children.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
            ],
        )
        self._wait_ready("kube-controller-manager", proc, lambda: self._http_ok(healthz, _UNVERIFIED_TLS))

    def _start_scheduler(self, paths: ComponentPaths) -> None:
        args, healthz = self._secure_component_args("kube-scheduler")
        proc = self._spawn("kube-scheduler", [str(paths.binary), *args])
        self._wait_ready("kube-scheduler", proc, lambda: self._http_ok(healthz, _UNVERIFIED_TLS))

    def _start_kwok(self, paths: ComponentPaths) -> None:
        port = free_port()
        # Flags from sigs.k8s.io/kwok pkg/kwok/cmd/root.go; each --config file is one Stage (pkg/config/flags.go).
        stages = [f"--config={paths.asset(name)}" for _, name in paths.component.assets]
        proc = self._spawn(
            "kwok",
            [
                str(paths.binary),
                f"--kubeconfig={self.kubeconfig}",
                # Every Node is a KWOK node: there is no kubelet here to share them with.
                "--manage-all-nodes=true",
                *stages,
                f"--server-address=127.0.0.1:{port}",
                # Pod IPs outside the Service range.
                "--cidr=10.244.0.1/16",
            ],
        )
        self._wait_ready("kwok", proc, lambda: self._http_ok(f"http://127.0.0.1:{port}/healthz"))

    def _start_kuberay(self, paths: ComponentPaths) -> None:
        self.install_crds([paths.asset("ray.io_rayservices.yaml")])
        probe = free_port()
        # Flags from ray-operator/main.go (v1.5.1); the kubeconfig reaches controller-runtime's
        # ctrl.GetConfigOrDie through $KUBECONFIG.
        proc = self._spawn(
            "kuberay-operator",
            [
                str(paths.binary),
                f"--metrics-addr=127.0.0.1:{free_port()}",
                f"--health-probe-bind-address=127.0.0.1:{probe}",
                "--enable-leader-election=false",
                "--log-stdout-encoder=console",
                # Reach each head's dashboard through the apiserver's service proxy (utils/util.go
                # GetRayDashboardClientFunc): this process runs outside any Pod network and cluster DNS.
                "--use-kubernetes-proxy",
            ],
            env={"KUBECONFIG": str(self.kubeconfig)},
        )
        self._wait_ready("kuberay-operator", proc, lambda: self._http_ok(f"http://127.0.0.1:{probe}/readyz"))

    def _start_kueue(self, paths: ComponentPaths) -> None:
        self.install_crds(sorted(paths.asset("crds").glob("*.yaml")))
        self.create_namespace(KUEUE_NAMESPACE)
        state = self.dir / "components" / "kueue"
        webhook_certs, metrics_certs = state / "webhook-certs", state / "metrics-certs"
        self._pki.issue_loopback_serving(webhook_certs, "kueue-webhook")
        self._pki.issue_loopback_serving(metrics_certs, "kueue-metrics")
        webhook_port, probe = free_port(), free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probe}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(webhook_certs)},
            "leaderElection": {"leaderElect": False},
            # The certificate comes from this cluster's CA instead of Kueue's in-cluster rotator,
            # which issues it for a Service name the apiserver could not reach here.
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": list(KUEUE_FRAMEWORKS)},
            # The on-demand visibility API is an aggregated apiserver on a fixed port; not needed.
            "featureGates": {"VisibilityOnDemand": False},
        }
        config_path = state / "config.yaml"
        config_path.write_text(json.dumps(config, indent=2))
        proc = self._spawn(
            "kueue",
            [str(paths.binary), f"--config={config_path}", f"--visibility-server-port={free_port()}"],
            env={"KUBECONFIG": str(self.kubeconfig), KUEUE_METRICS_CERT_ENV: str(metrics_certs)},
        )
        # Ready once the webhook server serves (cmd/kueue/main.go, the readyz check); only then may the apiserver
        # route admission to it.
        self._wait_ready("kueue", proc, lambda: self._http_ok(f"http://127.0.0.1:{probe}/readyz"))
        for configuration in kueue_webhook_configurations(
            paths.asset("webhooks.yaml"), f"https://127.0.0.1:{webhook_port}", self._pki.ca_cert.read_bytes()
        ):
            kind = configuration["kind"].lower() + "s"
            name = configuration["metadata"]["name"]
            self._server_side_apply(f"/apis/admissionregistration.k8s.io/v1/{kind}/{name}", configuration)

    def create_node(
        self,
        name: str,
        cpu: str = "32",
        memory: str = "256Gi",
        gpus: int = 0,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        timeout: float = 60.0,
    ) -> dict:
        """A KWOK node with this capacity (GPUs as `nvidia.com/gpu`), waited on until Ready and schedulable.

        A GPU node carries the `nvidia.com/gpu` NoSchedule taint GPU node pools usually have, unless
        `taints` says otherwise.
        """
        capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            capacity[GPU_RESOURCE] = str(gpus)
        if taints is None:
            taints = [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}] if gpus else []
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, "type": "kwok", **(labels or {})},
                "annotations": {"kwok.x-k8s.io/node": "fake"},
            },
            "spec": {"taints": taints},
            "status": {"capacity": capacity, "allocatable": capacity},
        }
        self.api("POST", "/api/v1/nodes", node)
        deadline = time.monotonic() + timeout
        while True:
            current = self.api("GET", f"/api/v1/nodes/{name}")
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in current.get("status", {}).get("conditions", [])
            )
            # The apiserver's TaintNodesByCondition admission adds node.kubernetes.io/not-ready at
            # creation; kube-controller-manager's node lifecycle lifts it once the node reports Ready.
            not_ready_taint = any(
                t["key"].startswith("node.kubernetes.io/") for t in current.get("spec", {}).get("taints", [])
            )
            if ready and not not_ready_taint:
                return current
            if time.monotonic() > deadline:
                self.raise_if_exited()
                raise ControlPlaneError(f"node {name} not Ready and untainted after {timeout:.0f}s: {current}")
            time.sleep(0.5)

    # -- kubeconfigs -------------------------------------------------------------------------

    @staticmethod
    def _b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    def _write_kubeconfig(self, path: Path, user: dict[str, str]) -> Path:
        # JSON is valid YAML, and every kubeconfig reader accepts it.
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "finetune-dev",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": self._b64(self._pki.ca_cert),
                    },
                }
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [
                {
                    "name": "finetune-dev",
                    "context": {
                        "cluster": "finetune-dev",
                        "user": "user",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": "finetune-dev",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def service_account_kubeconfig(self, namespace: str, name: str, expiration_seconds: int = 86400) -> Path:
        """A kubeconfig that authenticates as ServiceAccount `namespace/name` (which must exist).

        The token comes from the TokenRequest API, exactly as a Pod's projected token would, so
        a client using it has that ServiceAccount's RBAC permissions and nothing more.
        """
        response = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        path = self.dir / "kubeconfigs" / f"sa-{namespace}-{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        return self._write_kubeconfig(path, {"token": response["status"]["token"]})

    # -- clients -----------------------------------------------------------------------------

    def _run(self, argv: list[str], input: str | None, check: bool, env=None):
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, env=env)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | str | None = None,
        input: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run the pinned kubectl, as cluster admin unless another `kubeconfig` is given."""
        argv = [str(self.binaries.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        return self._run(argv, input, check)

    def helm(
        self,
        *args: str,
        kubeconfig: Path | str | None = None,
        input: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run the pinned helm against this cluster, with its config and caches in the state dir."""
        helm_home = self.dir / "helm"
        env = dict(
            os.environ,
            KUBECONFIG=str(kubeconfig or self.kubeconfig),
            HELM_CACHE_HOME=str(helm_home / "cache"),
            HELM_CONFIG_HOME=str(helm_home / "config"),
            HELM_DATA_HOME=str(helm_home / "data"),
        )
        return self._run([str(self.binaries.helm), *args], input, check, env)

    def apply(self, manifest: str, kubeconfig: Path | str | None = None) -> str:
        """Server-side apply a YAML/JSON manifest; returns kubectl's `-o name` output."""
        return self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-o",
            "name",
            "-f",
            "-",
            kubeconfig=kubeconfig,
            input=manifest,
        ).stdout

    def create_namespace(self, name: str) -> None:
        """Create (idempotently) a namespace with its `default` ServiceAccount."""
        self._server_side_apply(
            f"/api/v1/namespaces/{name}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
        self._server_side_apply(
            f"/api/v1/namespaces/{name}/serviceaccounts/default",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": name}},
        )

    def install_crds(self, paths: list[Path], timeout: float = 60.0) -> None:
        """Apply CRD files and wait until the apiserver serves them (Established)."""
        if not paths:
            return
        # kubectl, not PyYAML: KubeRay's CRDs are 3 MB of YAML that Python parses slowly.
        # Server-side, because they are too large for client-side apply's annotation.
        files = [arg for path in paths for arg in ("-f", str(path))]
        names = self.kubectl("apply", "--server-side", "--force-conflicts", "-o", "name", *files).stdout.split()
        # Not `kubectl wait` (it fails on a CRD whose status has no conditions yet), nor polling
        # the CRDs themselves (each GET of a KubeRay CRD serializes megabytes): the apiserver
        # lists a CRD's resource in discovery exactly when the CRD is Established.
        deadline = time.monotonic() + timeout
        for name in (n.split("/", 1)[1] for n in names):
            while not self._in_discovery(name):
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"CRD {name} not Established after {timeout:.0f}s")
                time.sleep(0.2)

    def _in_discovery(self, crd_name: str) -> bool:
        plural, group = crd_name.split(".", 1)
        try:
            return any(
                resource["name"] == plural
                for version in self.api("GET", f"/apis/{group}")["versions"]
                for resource in self.api("GET", f"/apis/{version['groupVersion']}")["resources"]
            )
        except ApiError as error:
            # The group or one of its versions is not served yet.
            if error.status == 404:
                return False
            raise

    # -- direct API access -------------------------------------------------------------------
    # The control plane's own setup talks to the API directly: a kubectl process per step
    # would pay for startup and discovery each time, several seconds on a busy 2-core machine.

    def api(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json") -> dict:
        """One request to the apiserver as cluster admin; returns the decoded JSON response."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self._admin_tls) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise ApiError(method, path, error.code, error.read().decode(errors="replace")) from None

    def _server_side_apply(self, path: str, obj: dict) -> dict:
        # JSON is YAML, so it is a valid apply-patch body; force takes over conflicting fields.
        return self.api(
            "PATCH",
            f"{path}?fieldManager=finetune-devcluster&force=true",
            obj,
            content_type="application/apply-patch+yaml",
        )
