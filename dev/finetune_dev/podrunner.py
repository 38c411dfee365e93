"""The container-runtime half of a kubelet for KWOK nodes: runs the containers of the Pods bound to chosen nodes as
local processes, so a Ray cluster that KubeRay created really runs.

KWOK keeps the status half (Running, Ready, the Pod IP). For every Pod bound to a served node this runs the
containers in namespaces of their own, as a container runtime would:
- a network namespace holding the Pod's IP, on a bridge shared by all Pods (the Pod network). The apiserver's service
  proxy, which KubeRay uses to reach each head's dashboard, dials that IP. Pods reach the apiserver at the
  `kubernetes` Service address (10.0.0.1:443), which the bridge owns and forwards to the apiserver;
- a mount namespace with a copy-on-write view of this machine's root (an overlay), a private /tmp and /dev/shm, and
  the Pod's volumes where its containers mount them: ConfigMaps, Secrets, emptyDirs, hostPath PersistentVolumes and
  the projected ServiceAccount token (a real bound token from the TokenRequest API);
- a PID namespace, so deleting the Pod kills every process it started; and its own hostname;
- `/etc/hosts` naming every Service of the namespace (what cluster DNS answers), rewritten as Pods come and go.

The image is not pulled: every container runs this checkout's Python environment, the content our trainer image
is built from. Init containers run to completion first, then the first container; its exit ends the Pod's processes.
The containers run as the Pod's `runAsUser`/`runAsGroup`/`fsGroup`. Needs root (namespaces, mounts, links).
"""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .controlplane import KUBERNETES_SERVICE_IP, ApiError, ControlPlane
from .testing import REPO_ROOT, SOURCE_ROOTS

# KWOK hands out Pod IPs from 10.244.0.0/16 (ControlPlane._start_kwok); the bridge takes the last address.
POD_NETWORK_PREFIX = 16
BRIDGE_ADDRESS = "10.244.255.254"
BRIDGE = "ftpods0"
SERVICE_DOMAIN = "svc.cluster.local"
NETNS_PREFIX = "ftp-"


class PodRunnerError(RuntimeError):
    """A Pod's spec asks for something this runner cannot provide."""


def available() -> str | None:
    """Why Pods cannot run here, or None."""
    if os.geteuid() != 0:
        return "running Pods needs root (network and mount namespaces)"
    missing = [tool for tool in ("ip", "unshare", "mount") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class _RunningPod:
    uid: str
    namespace: str
    name: str
    ip: str
    netns: str
    dir: Path
    proc: subprocess.Popen
    services_seen: str = ""
    exited: bool = False


@dataclass
class PodRunner:
    """Runs the Pods that the scheduler binds to `nodes` (KWOK nodes) until stopped."""

    cluster: ControlPlane
    nodes: tuple[str, ...]
    state_dir: Path
    poll_seconds: float = 0.5
    _pods: dict[str, _RunningPod] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _api_forwarder: socket.socket | None = None
    # Pods that could not be started, and the exits of their first processes (a Pod of a finished Ray cluster
    # exits when KubeRay deletes it; an early exit with an error is the runner's or the spec's problem).
    errors: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)

    def __enter__(self) -> PodRunner:
        problem = available()
        if problem:
            raise PodRunnerError(problem)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._start_network()
        loop = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
        loop.start()
        self._threads.append(loop)
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for uid in list(self._pods):
            self._kill(uid)
        if self._api_forwarder is not None:
            self._api_forwarder.close()
        _ip("link", "del", BRIDGE, check=False)

    # -- the Pod network ---------------------------------------------------------------------------

    def _start_network(self) -> None:
        # What a runner killed before its cleanup left: the Pods' processes, namespaces and the bridge.
        for line in _ip("netns", "list").stdout.splitlines():
            netns = line.split()[0]
            if netns.startswith(NETNS_PREFIX):
                for pid in _ip("netns", "pids", netns, check=False).stdout.split():
                    os.kill(int(pid), signal.SIGKILL)
                _ip("netns", "del", netns, check=False)
        _ip("link", "del", BRIDGE, check=False)
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/{POD_NETWORK_PREFIX}", "dev", BRIDGE)
        _ip("addr", "add", f"{KUBERNETES_SERVICE_IP}/32", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        # The `kubernetes` Service: in a cluster kube-proxy sends 10.0.0.1:443 to the apiserver; here a forwarder
        # on that address does (the serving certificate names 10.0.0.1).
        server = socket.create_server((KUBERNETES_SERVICE_IP, 443), reuse_port=False)
        self._api_forwarder = server
        host, port = self.cluster.url.removeprefix("https://").rsplit(":", 1)
        thread = threading.Thread(target=self._forward_api, args=(server, host, int(port)), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _forward_api(self, server: socket.socket, host: str, port: int) -> None:
        server.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((host, port), timeout=10)
            except OSError:
                client.close()
                continue
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, target), daemon=True).start()

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self._sync()
            except Exception as error:  # noqa: BLE001 - a failed pass is retried; the test reads `errors`
                self.errors.append(f"{type(error).__name__}: {error}")

    def _sync(self) -> None:
        pods = [
            pod
            for node in self.nodes
            for pod in self.cluster.api("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{node}").get("items", [])
        ]
        live = {}
        for pod in pods:
            uid = pod["metadata"]["uid"]
            if pod["metadata"].get("deletionTimestamp"):
                continue
            live[uid] = pod
            ip = (pod.get("status") or {}).get("podIP")
            if uid not in self._pods and ip and pod["status"].get("phase") == "Running":
                try:
                    self._start(pod, ip)
                except (PodRunnerError, ApiError, subprocess.CalledProcessError) as error:
                    self.errors.append(f"pod {pod['metadata']['name']}: {error}")
                    live.pop(uid)
        for uid, running in list(self._pods.items()):
            if uid not in live:
                self._kill(uid)
            elif running.proc.poll() is not None and not running.exited:
                running.exited = True
                code = running.proc.returncode
                log = _tail(running.dir / "runner.log", 20) if code else ""
                self.exits.append(f"pod {running.name} exited with code {code}" + (f":\n{log}" if log else ""))
        namespaces = {pod.namespace for pod in self._pods.values()}
        for namespace in namespaces:
            hosts = self._hosts(namespace)
            for pod in self._pods.values():
                if pod.namespace == namespace and pod.services_seen != hosts:
                    _rewrite(pod.dir / "hosts", f"127.0.0.1 localhost\n{pod.ip} {pod.name}\n{hosts}")
                    pod.services_seen = hosts

    def _hosts(self, namespace: str) -> str:
        """hosts(5) lines for the namespace's Services: each name to the IP of a Ready Pod it selects, as cluster DNS
        answers for a headless Service (and kube-proxy would route a ClusterIP one)."""
        lines = []
        services = self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/services").get("items", [])
        pods = self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods").get("items", [])
        for service in services:
            selector = (service.get("spec") or {}).get("selector") or {}
            if not selector:
                continue
            for pod in pods:
                labels = pod["metadata"].get("labels") or {}
                ip = (pod.get("status") or {}).get("podIP")
                if ip and all(labels.get(k) == v for k, v in selector.items()):
                    name = service["metadata"]["name"]
                    lines.append(f"{ip} {name}.{namespace}.{SERVICE_DOMAIN} {name}.{namespace}.svc {name}")
                    break
        return "\n".join(sorted(lines)) + "\n"

    # -- one Pod -------------------------------------------------------------------------------

    def _start(self, pod: dict[str, Any], ip: str) -> None:
        meta = pod["metadata"]
        uid, namespace, name = meta["uid"], meta["namespace"], meta["name"]
        pod_dir = self.state_dir / f"{namespace}_{name}_{uid[:8]}"
        pod_dir.mkdir(parents=True)
        volumes = self._volumes(pod, pod_dir / "volumes")
        security = pod["spec"].get("securityContext") or {}
        containers = [self._container(pod, c, volumes, ip) for c in pod["spec"].get("initContainers", [])]
        containers.append(self._container(pod, pod["spec"]["containers"][0], volumes, ip))
        (pod_dir / "hosts").write_text(f"127.0.0.1 localhost\n{ip} {name}\n")
        (pod_dir / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        spec = {
            "hostname": name[:63],
            "dir": str(pod_dir),
            "host_binds": sorted({sys.prefix, sys.base_prefix, str(REPO_ROOT)}),
            "uid": security.get("runAsUser", 0),
            "gid": security.get("runAsGroup", security.get("runAsUser", 0)),
            "groups": [g for g in (security.get("fsGroup"),) if g is not None],
            "containers": containers,
        }
        (pod_dir / "pod.json").write_text(json.dumps(spec, indent=2))
        netns = f"{NETNS_PREFIX}{uid[:8]}"
        veth = f"ftv{uid[:8]}"
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", BRIDGE, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/{POD_NETWORK_PREFIX}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", BRIDGE_ADDRESS)
        with open(pod_dir / "runner.log", "wb") as log:
            proc = subprocess.Popen(
                # `ip netns exec` enters the network namespace (and mounts its /sys); unshare adds mount, PID and
                # UTS namespaces, and kills the Pod's first process, and so its whole PID namespace, when it dies.
                ["ip", "netns", "exec", netns, "unshare", "--mount", "--pid", "--uts", "--fork", "--kill-child"]
                + ["--propagation", "private", sys.executable, "-m", "finetune_dev.podrunner", str(pod_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, SOURCE_ROOTS))},
            )
        self._pods[uid] = _RunningPod(uid, namespace, name, ip, netns, pod_dir, proc)

    def _kill(self, uid: str) -> None:
        pod = self._pods.pop(uid)
        if pod.proc.poll() is None:
            pod.proc.send_signal(signal.SIGKILL)
            pod.proc.wait()
        _ip("netns", "del", pod.netns, check=False)

    def log(self, name_prefix: str) -> str:
        """The container logs of every Pod whose name starts with `name_prefix` (for a failing test's report)."""
        out = []
        for pod_dir in sorted(self.state_dir.glob("*")):
            if pod_dir.name.split("_")[1].startswith(name_prefix):
                for log in sorted((pod_dir / "tmp").glob("*.log")):
                    out.append(f"--- {pod_dir.name}/{log.name} ---\n{_tail(log)}")
        return "\n".join(out)

    def _volumes(self, pod: dict[str, Any], root: Path) -> dict[str, dict[str, Any]]:
        """Each volume of the Pod as a mount source: a prepared directory, a host path, or a tmpfs."""
        meta, spec = pod["metadata"], pod["spec"]
        namespace = meta["namespace"]
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        out: dict[str, dict[str, Any]] = {}
        for volume in spec.get("volumes", []):
            name = volume["name"]
            target = root / name
            if "configMap" in volume or "secret" in volume:
                source = volume.get("configMap") or volume["secret"]
                kind, ref = (
                    ("configmaps", source["name"]) if "configMap" in volume else ("secrets", source["secretName"])
                )
                obj = self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/{kind}/{ref}")
                _write_items(target, _data(obj), source.get("items"))
                out[name] = {"bind": str(target)}
            elif "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    out[name] = {"tmpfs": _bytes(empty.get("sizeLimit") or "64Mi")}
                else:
                    target.mkdir(parents=True)
                    out[name] = {"bind": str(target)}
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                pvc = self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
                pv = self.cluster.api("GET", f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")
                if "hostPath" not in pv["spec"]:
                    raise PodRunnerError(f"volume {name}: only hostPath PersistentVolumes can be mounted here")
                out[name] = {"bind": pv["spec"]["hostPath"]["path"]}
            elif "hostPath" in volume:
                out[name] = {"bind": volume["hostPath"]["path"]}
            elif "projected" in volume:
                self._projected(pod, volume["projected"], target)
                out[name] = {"bind": str(target)}
            else:
                raise PodRunnerError(f"volume {name}: unsupported kind {sorted(set(volume) - {'name'})}")
            if fs_group is not None and "bind" in out[name] and str(root) in out[name]["bind"]:
                # The kubelet gives volumes it manages to the Pod's fsGroup.
                for path in [target, *target.rglob("*")]:
                    os.chown(path, -1, fs_group)
                    path.chmod(path.stat().st_mode | 0o070)
        return out

    def _projected(self, pod: dict[str, Any], projected: dict[str, Any], target: Path) -> None:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        for source in projected.get("sources", []):
            if "serviceAccountToken" in source:
                token_source = source["serviceAccountToken"]
                account = pod["spec"].get("serviceAccountName", "default")
                response = self.cluster.api(
                    "POST",
                    f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenRequest",
                        "spec": {
                            "audiences": [token_source["audience"]] if token_source.get("audience") else None,
                            "expirationSeconds": token_source.get("expirationSeconds", 3607),
                            "boundObjectRef": {
                                "apiVersion": "v1",
                                "kind": "Pod",
                                "name": meta["name"],
                                "uid": meta["uid"],
                            },
                        },
                    },
                )
                _write_items(target, {token_source["path"]: response["status"]["token"]}, None)
            elif "configMap" in source:
                ref = source["configMap"]
                obj = self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/configmaps/{ref['name']}")
                _write_items(target, _data(obj), ref.get("items"))
            elif "downwardAPI" in source:
                values = {
                    item["path"]: _field(pod, item["fieldRef"]["fieldPath"], "")
                    for item in source["downwardAPI"]["items"]
                }
                _write_items(target, values, None)
            else:
                raise PodRunnerError(f"projected source {sorted(source)} is not supported")

    def _container(self, pod: dict[str, Any], container: dict[str, Any], volumes: dict, ip: str) -> dict[str, Any]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {
            # What the image's environment provides: this checkout's Python first, then the system's.
            "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": os.pathsep.join(map(str, SOURCE_ROOTS)),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            # What the kubelet adds to every container.
            "KUBERNETES_SERVICE_HOST": KUBERNETES_SERVICE_IP,
            "KUBERNETES_SERVICE_PORT": "443",
            "HOSTNAME": pod["metadata"]["name"],
        }
        for source in container.get("envFrom", []):
            ref = source.get("secretRef") or source.get("configMapRef")
            kind = "secrets" if "secretRef" in source else "configmaps"
            env.update(_data(self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}")))
        for var in container.get("env", []):
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = _expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = _field(pod, source["fieldRef"]["fieldPath"], ip)
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                kind = "secrets" if "secretKeyRef" in source else "configmaps"
                env[var["name"]] = _data(
                    self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/{kind}/{ref['name']}")
                )[ref["key"]]
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, what = resource.partition(".")
                value = (container.get("resources") or {}).get(kind, {}).get(what, "0")
                env[var["name"]] = str(_bytes(value)) if what == "memory" else str(max(1, round(_cpus(value))))
            else:
                raise PodRunnerError(f"env {var['name']}: unsupported source {sorted(source)}")
        mounts = []
        for mount in container.get("volumeMounts", []):
            source = volumes.get(mount["name"])
            if source is None:
                raise PodRunnerError(f"volumeMount {mount['name']}: no such volume")
            mounts.append({**source, "target": mount["mountPath"], "readOnly": bool(mount.get("readOnly"))})
        argv = [*container.get("command", []), *container.get("args", [])]
        if not argv:
            raise PodRunnerError(
                f"container {container['name']}: no command (the image's entrypoint is not known here)"
            )
        return {
            "name": container["name"],
            "argv": [_expand(word, env) for word in argv],
            "env": env,
            "workingDir": container.get("workingDir") or "/",
            "mounts": mounts,
        }


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _rewrite(path: Path, text: str) -> None:
    # In place: the Pod's /etc/hosts is a bind mount of this inode, which a rename would leave behind.
    with open(path, "r+") as handle:
        handle.seek(0)
        handle.write(text)
        handle.truncate()


def _data(obj: dict[str, Any]) -> dict[str, str]:
    if obj.get("kind") == "Secret":
        return {key: base64.b64decode(value).decode() for key, value in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def _write_items(target: Path, data: dict[str, str], items: list[dict[str, str]] | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    chosen = [(item["key"], item["path"]) for item in items] if items else [(key, key) for key in data]
    for key, path in chosen:
        if key not in data:
            raise PodRunnerError(f"key {key!r} is not in the volume's source")
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text(data[key])


def _field(pod: dict[str, Any], path: str, ip: str) -> str:
    meta = pod["metadata"]
    for prefix, mapping in (("metadata.labels", meta.get("labels")), ("metadata.annotations", meta.get("annotations"))):
        if path.startswith(prefix + "["):
            return (mapping or {}).get(path[len(prefix) + 2 : -2], "")
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": ip,
        "status.hostIP": BRIDGE_ADDRESS,
    }
    if path not in values:
        raise PodRunnerError(f"fieldRef {path} is not supported")
    return values[path]


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references (a missing one stays as written; $$ escapes)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i)) != -1 and text[i + 2 : end] in env:
            out.append(env[text[i + 2 : end]])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: str) -> int:
    for suffix, factor in _SUFFIXES.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(float(quantity))


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- inside the Pod's namespaces -----------------------------------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _in_root(root: Path, path: str) -> Path:
    """`path` as seen from inside `root`: symlinks on the way (/var/run -> /run) resolve within it, not on the host."""
    current = root
    parts = [part for part in path.split("/") if part]
    hops = 0
    while parts:
        candidate = current / parts.pop(0)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise PodRunnerError(f"too many symbolic links in {path}")
            link = os.readlink(candidate)
            parts = [part for part in link.split("/") if part] + parts
            current = root if link.startswith("/") else current
            continue
        current = candidate
    return current


def _enter_pod(spec: dict[str, Any]) -> None:
    """Build the Pod's root (an overlay over this machine's) with its volumes, and chroot into it."""
    pod_dir = Path(spec["dir"])
    layers = pod_dir / "layers"
    layers.mkdir()
    # The overlay's writable layer on a tmpfs: an upper directory inside its own lower tree is refused.
    _mount("-t", "tmpfs", "-o", "size=256m", "tmpfs", str(layers))
    (layers / "upper").mkdir()
    (layers / "work").mkdir()
    root = pod_dir / "root"
    root.mkdir()
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={layers}/upper,workdir={layers}/work", str(root))
    _mount("-t", "proc", "proc", str(root / "proc"))
    _mount("--rbind", "/dev", str(root / "dev"))
    _mount("--rbind", "/sys", str(root / "sys"))
    _mount("-t", "tmpfs", "tmpfs", str(root / "dev" / "shm"))
    tmp = pod_dir / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    _mount("--bind", str(tmp), str(root / "tmp"))
    for path in spec["host_binds"]:
        _in_root(root, path).mkdir(parents=True, exist_ok=True)
        _mount("--bind", path, str(_in_root(root, path)))
    # The Python environment may live under /root (mode 0700); the Pod's user must reach it, as in an image.
    (root / "root").chmod(0o755)
    for name in ("hosts", "resolv.conf"):
        _mount("--bind", str(pod_dir / name), str(_in_root(root, f"/etc/{name}")))
    for container in spec["containers"]:
        for mount in container["mounts"]:
            target = _in_root(root, mount["target"])
            target.mkdir(parents=True, exist_ok=True)
            if "tmpfs" in mount:
                _mount("-t", "tmpfs", "-o", f"size={mount['tmpfs']},mode=1777", "tmpfs", str(target))
            else:
                _mount("--bind", mount["bind"], str(target))
            if mount["readOnly"]:
                _mount("-o", "remount,bind,ro", str(target))
    socket.sethostname(spec["hostname"])
    # Open files up to the hard limit, as container runtimes set it; KubeRay's command raises its soft limit to 65536.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.chroot(root)


def _run_pod(pod_dir: Path) -> int:
    spec = json.loads((pod_dir / "pod.json").read_text())
    _enter_pod(spec)

    def as_pod_user() -> None:
        os.setgroups(spec["groups"])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])

    code = 0
    for container in spec["containers"]:
        # The Pod's /tmp is the runner's <pod dir>/tmp, where a failing test reads the logs.
        with open(Path("/tmp") / f"{container['name']}.log", "ab") as log:
            proc = subprocess.Popen(
                container["argv"],
                env=container["env"],
                cwd=container["workingDir"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=as_pod_user,
            )
            code = _wait_reaping(proc.pid)
        if code != 0:
            break
    return code


def _wait_reaping(pid: int) -> int:
    """Wait for `pid`, reaping every orphan meanwhile: this process is PID 1 of the Pod's namespace."""
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            return 0
        if done == pid:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(_run_pod(Path(sys.argv[1])))
