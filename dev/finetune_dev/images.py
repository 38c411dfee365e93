"""Build the operator and trainer images from their Dockerfiles with buildah, and run them, with no container engine.

The Dockerfiles stay standard (a public Python or Ray base); here the base is swapped through `BASE_IMAGE` for a
Debian rootfs made by debootstrap, so nothing has to be pulled from a registry:

- The base, `localhost/finetune-base:bookworm`: Debian bookworm (`--variant=minbase`) with Debian's python3,
  python3-venv and ca-certificates, plus the CA certificates this host added under /usr/local/share/ca-certificates
  (so that a build behind a TLS-inspecting proxy can reach PyPI). The rootfs is cached as a tarball under
  `$FINETUNE_CACHE_DIR/images/` named by a digest of every input; the image carries that digest as a label, so an
  unchanged base is neither debootstrapped nor committed again.
- The images: `buildah bud --isolation chroot` of operator/Dockerfile and trainer/Dockerfile. uv inside the build
  installs from uv.lock; this host's uv cache is mounted at the Dockerfiles' cache-mount path, so a warm rebuild
  downloads nothing.

Everything lives in a buildah store of its own under `$FINETUNE_CACHE_DIR/images/storage` (the vfs driver: no
overlay or fuse needed), apart from the host's containers storage. `buildah run --isolation chroot` runs the images:
`ContainerRun` applies what a Pod's securityContext says as far as buildah allows (see its docstring).

    python -m finetune_dev.images build operator|trainer|base
    python -m finetune_dev.images clean
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .binaries import REPO_ROOT, cache_dir

BASE_IMAGE = "localhost/finetune-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
DEBIAN_MIRROR = os.environ.get("FINETUNE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
# Bumped when the way the base is made changes, so a base made the old way is not reused.
BASE_RECIPE = "1"
BASE_KEY_LABEL = "dev.finetune.base-key"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The Dockerfiles' `RUN --mount=type=cache` path; a --volume at the same path replaces buildah's own cache.
UV_CACHE_TARGET = "/root/.cache/uv"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
INPUTS_LABEL = "dev.finetune.inputs"
# What the Dockerfiles copy or mount from the build context (.dockerignore lets in these and nothing else).
CONTEXT_FILES = ("pyproject.toml", "uv.lock", "README.md", "dev/uv-requirements.txt")
CONTEXT_DIRS = ("api", "operator", "trainer")
CONTEXT_SKIPPED = {"__pycache__"}


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str
    tag: str


IMAGES = {
    "operator": ImageSpec("operator/Dockerfile", "localhost/finetune-operator:dev"),
    "trainer": ImageSpec("trainer/Dockerfile", "localhost/finetune-trainer:dev"),
}


def images_dir() -> Path:
    return cache_dir() / "images"


def missing_tools() -> str | None:
    """Why images cannot be built here, or None when they can."""
    absent = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (Debian: apt-get install -y buildah debootstrap)"
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    return None


def buildah(*args: str, capture: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    store = images_dir()
    argv = ["buildah", "--root", str(store / "storage"), "--runroot", str(store / "run"), "--storage-driver", "vfs"]
    result = subprocess.run([*argv, *args], capture_output=capture, text=True)
    if check and result.returncode != 0:
        detail = "\n" + "\n".join((result.stdout + result.stderr).splitlines()[-40:]) if capture else ""
        raise RuntimeError(f"buildah {' '.join(args[:2])} failed with exit code {result.returncode}{detail}")
    return result


def uv_cache_dir() -> Path:
    """This host's uv cache (uv's own default), shared with `make install`."""
    if os.environ.get("UV_CACHE_DIR"):
        return Path(os.environ["UV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "uv"


@contextmanager
def _build_lock():
    """One build at a time per store: buildah's vfs store and the base tarball are shared."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with open(images_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# -- the base ------------------------------------------------------------------------------------


def host_ca_certificates() -> list[Path]:
    return sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []


def base_key() -> str:
    """Digest of everything the base is made from."""
    architecture = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True)
    inputs = {
        "recipe": BASE_RECIPE,
        "suite": DEBIAN_SUITE,
        "variant": "minbase",
        "packages": DEBIAN_PACKAGES,
        "mirror": DEBIAN_MIRROR,
        "architecture": architecture.stdout.strip(),
        "host_cas": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in host_ca_certificates()},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _debootstrap_tarball(key: str) -> Path:
    tarball = images_dir() / f"base-{DEBIAN_SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    with tempfile.TemporaryDirectory(dir=images_dir(), prefix="rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cas = host_ca_certificates()
        for certificate in cas:
            shutil.copy2(certificate, rootfs / "usr/local/share/ca-certificates" / certificate.name)
        if cas:
            subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL)
        # The downloaded .debs are half the rootfs and never needed again.
        for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    return tarball


def _image_labels(image: str) -> dict[str, str] | None:
    found = buildah("inspect", "--type", "image", image, check=False)
    if found.returncode != 0:
        return None
    return json.loads(found.stdout)["OCIv1"]["config"].get("Labels") or {}


def build_base() -> str:
    """`localhost/finetune-base:bookworm`, made (or found) from the cached rootfs."""
    key = base_key()
    if (_image_labels(BASE_IMAGE) or {}).get(BASE_KEY_LABEL) == key:
        return BASE_IMAGE
    tarball = _debootstrap_tarball(key)
    container = buildah("from", "scratch").stdout.strip()
    try:
        buildah("add", container, str(tarball), "/")
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
        if host_ca_certificates():
            # uv and pip bring their own root certificates unless told to use the system's (with the host's CAs).
            env += [f"SSL_CERT_FILE={SYSTEM_CA_BUNDLE}", f"PIP_CERT={SYSTEM_CA_BUNDLE}"]
        config = ["config", "--cmd", "/bin/bash", "--label", f"{BASE_KEY_LABEL}={key}"]
        for variable in env:
            config += ["--env", variable]
        buildah(*config, container)
        buildah("commit", "--quiet", "--rm", container, BASE_IMAGE)
    except BaseException:
        buildah("rm", container, check=False)
        raise
    buildah("rmi", "--prune", check=False)
    return BASE_IMAGE


# -- the images ----------------------------------------------------------------------------------


def image_size_bytes(image: str) -> int:
    """Uncompressed size: the sum of the image's layers as stored."""
    inspected = json.loads(buildah("inspect", "--type", "image", image).stdout)
    return sum(layer["size"] for layer in json.loads(inspected["Manifest"])["layers"])


def context_digest(spec: ImageSpec, base_image_id: str) -> str:
    """Digest of what the Dockerfile builds from: itself, the files it copies or mounts, and the base image."""
    digest = hashlib.sha256(base_image_id.encode())
    files = [REPO_ROOT / path for path in (spec.dockerfile, ".dockerignore", *CONTEXT_FILES)]
    for directory in CONTEXT_DIRS:
        files += sorted(
            path
            for path in (REPO_ROOT / directory).rglob("*")
            if path.is_file()
            and not any(part in CONTEXT_SKIPPED or part.endswith(".egg-info") for part in path.parts)
            and path.suffix != ".pyc"
        )
    for path in files:
        digest.update(f"{path.relative_to(REPO_ROOT)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def build_image(name: str, quiet: bool = True, force: bool = False) -> str:
    """Build `name` (operator or trainer) from its Dockerfile on the local base; returns the image's tag.

    The image is labelled with the digest of its inputs and not rebuilt while they are unchanged (unless `force`).
    """
    spec = IMAGES[name]
    with _build_lock():
        base = build_base()
        inputs = context_digest(
            spec, buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", base).stdout
        )
        if not force and (_image_labels(spec.tag) or {}).get(INPUTS_LABEL) == inputs:
            return spec.tag
        uv_cache = uv_cache_dir()
        uv_cache.mkdir(parents=True, exist_ok=True)
        args = [
            "bud",
            "--isolation",
            "chroot",
            "--pull-never",
            "--file",
            str(REPO_ROOT / spec.dockerfile),
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--volume",
            f"{uv_cache}:{UV_CACHE_TARGET}",
            "--label",
            f"{INPUTS_LABEL}={inputs}",
            "--tag",
            spec.tag,
        ]
        if quiet:
            args.append("--quiet")
        buildah(*args, str(REPO_ROOT), capture=quiet)
        # The image the tag pointed to before, now untagged: with vfs every layer is a full copy, so do not keep it.
        buildah("rmi", "--prune", check=False)
    return spec.tag


def clean() -> None:
    """Remove every container and image from the store (the base tarball and the uv cache stay)."""
    buildah("rm", "--all", check=False)
    buildah("rmi", "--all", "--force", check=False)


# -- running an image as a Pod would -------------------------------------------------------------


def image_entrypoint(image: str) -> list[str]:
    config = json.loads(buildah("inspect", "--type", "image", image).stdout)["OCIv1"]["config"]
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


@dataclass
class PodSettings:
    """What buildah can apply from a Pod template's container: user, environment, read-only root, emptyDirs."""

    user: str
    env: dict[str, str]
    read_only_root: bool
    drop_all_capabilities: bool
    empty_dirs: list[str]
    args: list[str] = field(default_factory=list)


def pod_settings(deployment: dict[str, Any], pod_name: str, pod_namespace: str) -> PodSettings:
    """The first container of a rendered Deployment, with the downward-API fields it reads filled in."""
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    fields = {"metadata.name": pod_name, "metadata.namespace": pod_namespace}
    env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            env[variable["name"]] = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
    empty = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
    return PodSettings(
        user=f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}",
        env=env,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        drop_all_capabilities="ALL" in security.get("capabilities", {}).get("drop", []),
        empty_dirs=[mount["mountPath"] for mount in container.get("volumeMounts", []) if mount["name"] in empty],
        args=[*container.get("command", []), *container.get("args", [])],
    )


def write_service_account_dir(directory: Path, token: str, ca_certificate: bytes, namespace: str) -> Path:
    """The files a Pod's projected ServiceAccount volume holds: token, ca.crt and namespace."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(ca_certificate)
    (directory / "namespace").write_text(namespace)
    for path in directory.iterdir():
        path.chmod(0o644)
    return directory


def kubeconfig_ca(kubeconfig: Path) -> bytes:
    config = json.loads(kubeconfig.read_text())
    return base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"])


class Container:
    """A buildah working container of an image, to run commands in; removed on exit.

    With the vfs driver, creating one copies the whole image, so one container serves several runs.
    """

    def __init__(self, image: str):
        self.image, self.id = image, ""
        self.rootfs: Path | None = None

    def __enter__(self) -> Container:
        self.id = buildah("from", "--pull-never", "--quiet", self.image).stdout.strip()
        self.rootfs = Path(buildah("mount", self.id).stdout.strip())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        buildah("rm", self.id, check=False)

    def run(self, command: list[str], log_path: Path, **settings: Any) -> ContainerRun:
        """A ContainerRun of `command` in this container (not yet started); see ContainerRun for `settings`."""
        return ContainerRun(self, command, log_path, **settings)

    def path(self, path: str) -> str:
        """`path` with the image's own symlinks resolved (as a runtime does: /var/run is a link to /run on Debian)."""
        resolved = Path("/")
        for part in Path(path).parts[1:]:
            candidate = resolved / part
            host = self.rootfs / candidate.relative_to("/")
            if host.is_symlink():
                target = Path(os.readlink(host))
                candidate = target if target.is_absolute() else resolved / target
            resolved = candidate
        return str(resolved)


class ContainerRun:
    """`buildah run --isolation chroot` of a command, in the background, with what a Pod's securityContext asks.

    What chroot isolation gives: the user (runAsUser/runAsGroup), no effective capabilities (`--cap-drop all`),
    the default seccomp filter, tmpfs for emptyDir mounts and bind mounts for volumes. It has no read-only root
    option, so every top-level directory of the image is bind-mounted read-only over itself; `/` itself, `/run`
    and `/dev` stay writable for root only (buildah writes /run/.containerenv and /etc/resolv.conf there), which a
    non-root process cannot use. It has no network namespace: the process shares the host's network, so listening
    ports must be free on the host, and the local apiserver is reached on 127.0.0.1. No new privileges is not set.
    """

    WRITABLE_TOP_LEVEL = {"proc", "sys", "dev", "run"}

    def __init__(
        self,
        container: Container,
        command: list[str],
        log_path: Path,
        user: str | None = None,
        env: dict[str, str] | None = None,
        read_only_root: bool = False,
        drop_all_capabilities: bool = False,
        tmpfs: list[str] = (),
        volumes: dict[str, Path] | None = None,
        read_only_volumes: dict[str, Path] | None = None,
        workdir: str | None = None,
    ):
        self.container, self.command, self.log_path = container, command, log_path
        self.user, self.env, self.read_only_root = user, env or {}, read_only_root
        self.drop_all_capabilities, self.tmpfs = drop_all_capabilities, list(tmpfs)
        self.volumes = {path: (source, False) for path, source in (volumes or {}).items()}
        self.volumes |= {path: (source, True) for path, source in (read_only_volumes or {}).items()}
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        container, rootfs = self.container, self.container.rootfs
        argv = ["run", "--isolation", "chroot", "--no-hosts"]
        if self.user:
            argv += ["--user", self.user]
        if self.drop_all_capabilities:
            argv += ["--cap-drop", "all"]
        if self.workdir:
            argv += ["--workingdir", self.workdir]
        for name, value in self.env.items():
            argv += ["--env", f"{name}={value}"]
        targets = [container.path(path) for path in [*self.tmpfs, *self.volumes]]
        # A mount target is not covered by a read-only bind (that would hide the mount), nor a directory in which a
        # missing target has to be created.
        keep = {
            target.split("/")[1] for target in targets if target.count("/") == 1 or not (rootfs / target[1:]).exists()
        }
        if self.read_only_root:
            for entry in sorted(rootfs.iterdir()):
                if entry.is_dir() and not entry.is_symlink() and entry.name not in self.WRITABLE_TOP_LEVEL | keep:
                    argv += ["--mount", f"type=bind,src={entry},dst=/{entry.name},ro=true"]
        for path in self.tmpfs:
            argv += ["--mount", f"type=tmpfs,dst={container.path(path)}"]
        for path, (source, read_only) in self.volumes.items():
            # buildah's bind mounts are read-only unless told otherwise.
            mode = "ro=true" if read_only else "rw=true"
            argv += ["--mount", f"type=bind,src={source},dst={container.path(path)},{mode}"]
        return [*argv, container.id, "--", *self.command]

    def start(self) -> ContainerRun:
        store = images_dir()
        argv = ["buildah", "--root", str(store / "storage"), "--runroot", str(store / "run"), "--storage-driver", "vfs"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*argv, *self.argv()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.output().splitlines()[-lines:]) or "(no log)"

    def stop(self) -> None:
        """SIGTERM to the run's process group (buildah and what runs in the container), SIGKILL after 30 s."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> ContainerRun:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


# -- CLI -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_dev.images", description="Build the images with buildah on a local Debian base."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build an image (and the base, when its inputs changed)")
    build.add_argument("image", choices=[*IMAGES, "base"])
    build.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    commands.add_parser("clean", help="remove every image and container from the store (caches stay)")
    args = parser.parse_args(argv)
    reason = missing_tools()
    if reason:
        print(f"cannot build images: {reason}", file=sys.stderr)
        return 2
    if args.command == "clean":
        clean()
        return 0
    started = time.monotonic()
    if args.image == "base":
        with _build_lock():
            tag = build_base()
    else:
        tag = build_image(args.image, quiet=False, force=args.force)
    size = image_size_bytes(tag) / 1e6
    print(f"{tag}: {size:.0f} MB, built in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
