"""Build and cache the Kubernetes binaries the dev cluster runs.

kube-apiserver, kubectl, etcd and helm are compiled from their own Go modules, pinned by the
small modules under ``dev/tools/``, and fetched through the Go module proxy: no prebuilt
binary is downloaded from anywhere. KubeRay's RayJob and RayCluster CRDs are copied out of its
pinned Go module.

The results are cached under ``$FINETUNE_CACHE_DIR/k8s/<version-key>/`` (default
``~/.cache/finetune-operator``). The key names every pinned version plus a digest of the tool
modules' go.mod and tools.go files, so a version bump builds into a fresh directory and an
unchanged pin costs one ``stat`` per file.

The neighbours a cluster can also run (kube-controller-manager, kube-scheduler, KWOK, the
KubeRay operator, Kueue) are built the same way but one at a time, only when first asked for
(``ensure_component``), each into its own cache directory keyed by its pin.
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
# The tool modules the base binaries (and so the base version key) come from.
BASE_TOOLS = ("etcd", "helm", "kuberay", "kubernetes")

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
    digest = _tools_digest(BUILD_RECIPE, BASE_TOOLS)
    return f"k8s-{versions.kubernetes}_etcd-{versions.etcd}_helm-{versions.helm}_kuberay-{versions.kuberay}_{digest}"


def _tools_digest(recipe: str, tools: tuple[str, ...]) -> str:
    digest = hashlib.sha256(recipe.encode())
    for tool in sorted(tools):
        for path in sorted((TOOLS_DIR / tool).glob("*")):
            if path.name in ("go.mod", "tools.go"):
                digest.update(path.relative_to(TOOLS_DIR).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


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


def _go_build(go: str, tool: str, package: str, output: Path, ldflags: list[str], extra: list[str] = ()) -> None:
    started = time.monotonic()
    _log(f"building {output.name} ({package}) ...")
    partial = output.with_name(output.name + ".partial")
    flags = " ".join(["-s", "-w", *ldflags])
    _run_go(go, ["build", "-trimpath", "-ldflags", flags, *extra, "-o", str(partial), package], TOOLS_DIR / tool)
    partial.replace(output)
    _log(f"built {output.name} in {time.monotonic() - started:.0f}s")


def _module_dir(go: str, tool: str, module: str) -> Path:
    """Where the module cache holds the pinned `module` (downloading it through the proxy if needed)."""
    info = json.loads(_run_go(go, ["mod", "download", "-json", module], TOOLS_DIR / tool))
    if "Error" in info:
        raise BuildError(f"downloading {module}: {info['Error']}")
    return Path(info["Dir"])


def _build_all(paths: Paths, go: str) -> None:
    versions = paths.versions
    helm_client_go = _required_version(TOOLS_DIR / "helm" / "go.mod", "k8s.io/client-go")
    ldflags = _version_ldflags(versions, helm_client_go.lstrip("v").split(".")[1])
    targets = [
        ("etcd", ETCD_MODULE, paths.etcd),
        ("kubernetes", f"{KUBERNETES_MODULE}/cmd/kube-apiserver", paths.kube_apiserver),
        ("kubernetes", f"{KUBERNETES_MODULE}/cmd/kubectl", paths.kubectl),
        ("helm", f"{HELM_MODULE}/cmd/helm", paths.helm),
    ]
    paths.bin_dir.mkdir(parents=True, exist_ok=True)
    for tool, package, output in targets:
        _go_build(go, tool, package, output, ldflags[tool])

    kuberay_dir = _module_dir(go, "kuberay", KUBERAY_MODULE)
    crd_dir = paths.root / "crds"
    crd_dir.mkdir(parents=True, exist_ok=True)
    for name in KUBERAY_CRDS:
        shutil.copyfile(kuberay_dir / "config" / "crd" / "bases" / name, crd_dir / name)
    _log(f"copied KubeRay {versions.kuberay} CRDs to {crd_dir}")


def _is_complete(paths: Paths) -> bool:
    return (paths.root / _COMPLETE_MARKER).exists() and all(p.exists() for p in paths.all_files())


def _require_go() -> str:
    go = find_go()
    if go is None:
        raise GoNotFoundError(
            "the dev cluster builds kube-apiserver, etcd, kubectl and helm from source and needs "
            "Go (>= 1.25) on PATH, at /usr/local/go/bin/go, or named by $FINETUNE_GO"
        )
    return go


def ensure_binaries() -> Paths:
    """Return the cached binaries for the pinned versions, building them first if needed.

    Concurrent callers (parallel test sessions, a dev cluster started while tests run) wait on
    a lock file, so only one of them builds.
    """
    versions = pinned_versions()
    paths = Paths(root=cache_dir() / "k8s" / version_key(versions), versions=versions)
    if not _is_complete(paths):
        go = _require_go()
        note = (
            f"building Kubernetes {versions.kubernetes}, etcd {versions.etcd}, Helm {versions.helm} "
            f"from source into {paths.root} (first run only; about 15 minutes on 2 cores)"
        )
        _build_locked(paths.root, lambda: _is_complete(paths), lambda: _build_all(paths, go), note)
    return paths


def _build_locked(root: Path, is_complete, build, note: str) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f"{root.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is building {root.name}; waiting on {lock_path}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete():
            return
        started = time.monotonic()
        _log(note)
        build()
        (root / _COMPLETE_MARKER).write_text(f"{time.monotonic() - started:.0f}s\n")
        _log(f"{root.name} ready in {time.monotonic() - started:.0f}s")


# -- neighbours: the controllers a dev cluster can run beside the apiserver ---------------------

KWOK_MODULE = "sigs.k8s.io/kwok"
KUEUE_MODULE = "sigs.k8s.io/kueue"
# KWOK's controller has no built-in behaviour: each node and pod transition is a Stage. These are
# the ones `kwokctl` installs by default (pkg/kwokctl/runtime/cluster.go, getDefaultNodeStages and
# getDefaultPodStages), less pod-complete: it would mark a KubeRay submitter Pod (owned by a Job)
# Succeeded at once, although no Ray job ran.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat/node-heartbeat.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
# Without its own certificate management, Kueue's cmd/kueue/main.go reads the metrics serving
# certificate from this fixed path; the build rewrites it to an environment variable, so a dev
# cluster can serve Kueue without writing under /etc.
KUEUE_METRICS_CERT_LITERAL = '"/etc/kueue/metrics/certs"'
KUEUE_METRICS_CERT_ENV = "KUEUE_METRICS_CERT_DIR"


@dataclass(frozen=True)
class Component:
    """One neighbour binary: the tool module that pins it, the package built, the files copied beside it."""

    name: str
    tool: str
    module: str
    package: str
    # (path inside the module, file name in the component's directory)
    assets: tuple[tuple[str, str], ...] = ()
    # Asset directories copied whole: (path inside the module, directory name).
    asset_dirs: tuple[tuple[str, str], ...] = ()


COMPONENTS = {
    component.name: component
    for component in (
        Component(
            "kube-controller-manager",
            "kubernetes",
            KUBERNETES_MODULE,
            f"{KUBERNETES_MODULE}/cmd/kube-controller-manager",
        ),
        Component("kube-scheduler", "kubernetes", KUBERNETES_MODULE, f"{KUBERNETES_MODULE}/cmd/kube-scheduler"),
        Component(
            "kwok", "kwok", KWOK_MODULE, f"{KWOK_MODULE}/cmd/kwok", assets=tuple((s, Path(s).name) for s in KWOK_STAGES)
        ),
        Component(
            "kuberay-operator",
            "kuberay",
            KUBERAY_MODULE,
            KUBERAY_MODULE,
            # The operator always starts its RayService controller (main.go), which needs that CRD.
            assets=(("config/crd/bases/ray.io_rayservices.yaml", "ray.io_rayservices.yaml"),),
        ),
        Component(
            "kueue",
            "kueue",
            KUEUE_MODULE,
            f"{KUEUE_MODULE}/cmd/kueue",
            assets=(("config/components/webhook/manifests.yaml", "webhooks.yaml"),),
            asset_dirs=(("config/components/crd/bases", "crds"),),
        ),
    )
}


@dataclass(frozen=True)
class ComponentPaths:
    """A built neighbour: its binary and the files copied out of its module."""

    root: Path
    component: Component
    version: str

    @property
    def binary(self) -> Path:
        return self.root / "bin" / self.component.name

    def asset(self, name: str) -> Path:
        return self.root / name

    def all_files(self) -> list[Path]:
        return [
            self.binary,
            *(self.root / name for _, name in self.component.assets),
            *(self.root / name for _, name in self.component.asset_dirs),
        ]


def component_paths(name: str) -> ComponentPaths:
    try:
        component = COMPONENTS[name]
    except KeyError:
        raise ValueError(f"unknown component {name!r}; expected one of {', '.join(COMPONENTS)}") from None
    version = _required_version(TOOLS_DIR / component.tool / "go.mod", component.module)
    digest = _tools_digest(f"{BUILD_RECIPE}/{name}", (component.tool,))
    root = cache_dir() / "k8s" / f"{name}-{version}_{digest}"
    return ComponentPaths(root=root, component=component, version=version)


def ensure_component(name: str) -> ComponentPaths:
    """The cached build of one neighbour (see COMPONENTS), built first if needed, under the same lock scheme."""
    paths = component_paths(name)

    def complete() -> bool:
        return (paths.root / _COMPLETE_MARKER).exists() and all(p.exists() for p in paths.all_files())

    if not complete():
        go = _require_go()
        note = f"building {name} {paths.version} from source into {paths.root} (first use only)"
        _build_locked(paths.root, complete, lambda: _build_component(paths, go), note)
    return paths


def _build_component(paths: ComponentPaths, go: str) -> None:
    component = paths.component
    module_dir = _module_dir(go, component.tool, component.module)
    package, ldflags, extra = component.package, [], []
    if component.tool == "kubernetes":
        ldflags = _version_ldflags(pinned_versions(), "0")["kubernetes"]
    if component.name == "kueue":
        package, overlay = _kueue_overlay(paths.root, module_dir)
        extra = ["-overlay", str(overlay)]
    paths.binary.parent.mkdir(parents=True, exist_ok=True)
    _go_build(go, component.tool, package, paths.binary, ldflags, extra)
    for source, name in component.assets:
        shutil.copyfile(module_dir / source, paths.root / name)
    for source, name in component.asset_dirs:
        shutil.copytree(module_dir / source, paths.root / name, dirs_exist_ok=True)


def _kueue_overlay(root: Path, module_dir: Path) -> tuple[str, Path]:
    """Kueue's cmd/kueue/main.go, reading the metrics certificate directory from the environment, as the main
    package `./cmd/kueue` of the tool module (Go refuses overlays of files in the module cache), and the
    `go build -overlay` file that puts it there; every other package is Kueue's own."""
    main = module_dir / "cmd" / "kueue" / "main.go"
    source = main.read_text()
    if source.count(KUEUE_METRICS_CERT_LITERAL) != 1:
        raise BuildError(f"{main} no longer contains {KUEUE_METRICS_CERT_LITERAL} exactly once; update binaries.py")
    patched = root / "overlay" / "main.go"
    patched.parent.mkdir(parents=True, exist_ok=True)
    patched.write_text(source.replace(KUEUE_METRICS_CERT_LITERAL, f'os.Getenv("{KUEUE_METRICS_CERT_ENV}")'))
    overlay = root / "overlay" / "overlay.json"
    overlay.write_text(json.dumps({"Replace": {str(TOOLS_DIR / "kueue" / "cmd" / "kueue" / "main.go"): str(patched)}}))
    return "./cmd/kueue", overlay
