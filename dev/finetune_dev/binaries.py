"""Build and cache the Kubernetes binaries the dev cluster runs.

kube-apiserver, kubectl, etcd and helm are compiled from their own Go modules, pinned by the
small modules under ``dev/tools/``, and fetched through the Go module proxy: no prebuilt
binary is downloaded from anywhere. KubeRay's RayJob and RayCluster CRDs are copied out of its
pinned Go module.

The results are cached under ``$FINETUNE_CACHE_DIR/k8s/<version-key>/`` (default
``~/.cache/finetune-operator``). The key names every pinned version plus a digest of the tool
modules' go.mod and tools.go files, so a version bump builds into a fresh directory and an
unchanged pin costs one ``stat`` per file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(os.environ.get("FINETUNE_REPO_ROOT", Path(__file__).resolve().parents[2]))
TOOLS_DIR = REPO_ROOT / "dev" / "tools"

KUBERNETES_MODULE = "k8s.io/kubernetes"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
HELM_MODULE = "helm.sh/helm/v3"
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
# RayService is left out: the operator never creates one, and each of these multi-megabyte
# CRDs costs the apiserver seconds of CPU at every control-plane start.
KUBERAY_CRDS = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml")

# Bumped when the way binaries are built changes, so caches made the old way are not reused.
BUILD_RECIPE = "1"
_COMPLETE_MARKER = ".complete"


class GoNotFoundError(RuntimeError):
    """No Go toolchain, so the binaries cannot be built."""


class BuildError(RuntimeError):
    """A `go` command failed while building the binaries."""


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    etcd: str
    helm: str
    kuberay: str

    @property
    def kubernetes_minor(self) -> str:
        return self.kubernetes.lstrip("v").split(".")[1]


@dataclass(frozen=True)
class Paths:
    """Where the built binaries and the KubeRay CRDs of one version key live."""

    root: Path
    versions: Versions

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def kube_apiserver(self) -> Path:
        return self.bin_dir / "kube-apiserver"

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def etcd(self) -> Path:
        return self.bin_dir / "etcd"

    @property
    def helm(self) -> Path:
        return self.bin_dir / "helm"

    @property
    def kuberay_crds(self) -> list[Path]:
        return [self.root / "crds" / name for name in KUBERAY_CRDS]

    def all_files(self) -> list[Path]:
        return [self.kube_apiserver, self.kubectl, self.etcd, self.helm, *self.kuberay_crds]


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune-operator"))


def find_go() -> str | None:
    """The `go` command: $FINETUNE_GO, then PATH, then the default install location."""
    candidates = [os.environ.get("FINETUNE_GO"), shutil.which("go"), "/usr/local/go/bin/go"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _required_version(go_mod: Path, module: str) -> str:
    """The version `go_mod` requires for `module` (single-line or block `require`)."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", go_mod.read_text(), re.M)
    if not match:
        raise BuildError(f"{go_mod} does not require {module}")
    return match.group(1)


def pinned_versions() -> Versions:
    return Versions(
        kubernetes=_required_version(TOOLS_DIR / "kubernetes" / "go.mod", KUBERNETES_MODULE),
        etcd=_required_version(TOOLS_DIR / "etcd" / "go.mod", ETCD_MODULE),
        helm=_required_version(TOOLS_DIR / "helm" / "go.mod", HELM_MODULE),
        kuberay=_required_version(TOOLS_DIR / "kuberay" / "go.mod", KUBERAY_MODULE),
    )


def version_key(versions: Versions) -> str:
    # go.sum is left out: it only records hashes of what go.mod selects, and a build with
    # -mod=mod may add lines to it, which must not invalidate the binaries it just built.
    digest = hashlib.sha256(BUILD_RECIPE.encode())
    for path in sorted(TOOLS_DIR.glob("*/*")):
        if path.name in ("go.mod", "tools.go"):
            digest.update(path.relative_to(TOOLS_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return (
        f"k8s-{versions.kubernetes}_etcd-{versions.etcd}_helm-{versions.helm}"
        f"_kuberay-{versions.kuberay}_{digest.hexdigest()[:10]}"
    )


def _log(message: str) -> None:
    print(f"[devcluster] {message}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Static binaries that need no C toolchain; -mod=mod lets go.sum gain entries for the
    # exact packages built without a separate `go mod download` step.
    env.update(CGO_ENABLED="0", GOFLAGS="-mod=mod")
    return env


def _run_go(go: str, args: list[str], module_dir: Path) -> str:
    proc = subprocess.run([go, *args], cwd=module_dir, env=_go_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"`go {' '.join(args)}` in {module_dir} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def _version_ldflags(versions: Versions, helm_client_go_minor: str) -> dict[str, list[str]]:
    """-X flags that make each binary report its real version, as the upstream Makefiles do.

    Without them kube-apiserver reports v0.0.0-master, which breaks Helm's kubeVersion checks.
    """
    major, minor = "1", versions.kubernetes_minor
    k8s = [
        f"-X {pkg}.{var}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for var, value in (
            ("gitVersion", versions.kubernetes),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        )
    ]
    helm = [f"-X helm.sh/helm/v3/internal/version.version={versions.helm}"] + [
        f"-X helm.sh/helm/v3/pkg/{pkg}.{var}={value}"
        for pkg in ("chartutil", "lint/rules")
        # Helm's Makefile derives the default Capabilities.KubeVersion from its client-go.
        for var, value in (("k8sVersionMajor", "1"), ("k8sVersionMinor", helm_client_go_minor))
    ]
    return {"kubernetes": k8s, "etcd": [], "helm": helm}


def _build_all(paths: Paths, go: str) -> None:
    versions = paths.versions
    helm_client_go = _required_version(TOOLS_DIR / "helm" / "go.mod", "k8s.io/client-go")
    ldflags = _version_ldflags(versions, helm_client_go.lstrip("v").split(".")[1])
    targets = [
        ("etcd", "etcd", ETCD_MODULE, versions.etcd, paths.etcd),
        (
            "kubernetes",
            "kube-apiserver",
            f"{KUBERNETES_MODULE}/cmd/kube-apiserver",
            versions.kubernetes,
            paths.kube_apiserver,
        ),
        ("kubernetes", "kubectl", f"{KUBERNETES_MODULE}/cmd/kubectl", versions.kubernetes, paths.kubectl),
        ("helm", "helm", f"{HELM_MODULE}/cmd/helm", versions.helm, paths.helm),
    ]
    paths.bin_dir.mkdir(parents=True, exist_ok=True)
    for tool, name, package, version, output in targets:
        started = time.monotonic()
        _log(f"building {name} ({package} {version}) ...")
        partial = output.with_name(output.name + ".partial")
        flags = " ".join(["-s", "-w", *ldflags[tool]])
        _run_go(go, ["build", "-trimpath", "-ldflags", flags, "-o", str(partial), package], TOOLS_DIR / tool)
        partial.replace(output)
        _log(f"built {name} in {time.monotonic() - started:.0f}s")

    info = json.loads(_run_go(go, ["mod", "download", "-json", KUBERAY_MODULE], TOOLS_DIR / "kuberay"))
    if "Error" in info:
        raise BuildError(f"downloading {KUBERAY_MODULE}: {info['Error']}")
    crd_dir = paths.root / "crds"
    crd_dir.mkdir(parents=True, exist_ok=True)
    for name in KUBERAY_CRDS:
        shutil.copyfile(Path(info["Dir"]) / "config" / "crd" / "bases" / name, crd_dir / name)
    _log(f"copied KubeRay {versions.kuberay} CRDs to {crd_dir}")


def _is_complete(paths: Paths) -> bool:
    return (paths.root / _COMPLETE_MARKER).exists() and all(p.exists() for p in paths.all_files())


def ensure_binaries() -> Paths:
    """Return the cached binaries for the pinned versions, building them first if needed.

    Concurrent callers (parallel test sessions, a dev cluster started while tests run) wait on
    a lock file, so only one of them builds.
    """
    versions = pinned_versions()
    paths = Paths(root=cache_dir() / "k8s" / version_key(versions), versions=versions)
    if _is_complete(paths):
        return paths

    go = find_go()
    if go is None:
        raise GoNotFoundError(
            "the dev cluster builds kube-apiserver, etcd, kubectl and helm from source and needs "
            "Go (>= 1.25) on PATH, at /usr/local/go/bin/go, or named by $FINETUNE_GO"
        )
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    return _build_locked(paths, go)


def _build_locked(paths: Paths, go: str) -> Paths:
    lock_path = paths.root.parent / f"{paths.root.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is building the binaries; waiting on {lock_path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(paths):
            return paths
        started = time.monotonic()
        _log(
            f"building Kubernetes {paths.versions.kubernetes}, etcd {paths.versions.etcd}, "
            f"Helm {paths.versions.helm} from source into {paths.root} "
            "(first run only; about 15 minutes on 2 cores)"
        )
        _build_all(paths, go)
        (paths.root / _COMPLETE_MARKER).write_text(f"{time.monotonic() - started:.0f}s\n")
        _log(f"binaries ready in {time.monotonic() - started:.0f}s")
    return paths
