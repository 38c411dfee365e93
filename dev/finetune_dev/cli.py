"""`finetune dev-cluster` / `make dev-cluster`: a local control plane in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .binaries import BuildError, GoNotFoundError, cache_dir, ensure_binaries
from .controlplane import ControlPlane, ControlPlaneError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="finetune dev-cluster",
        description="Run etcd + kube-apiserver (RBAC on, KubeRay and finetune CRDs installed) "
        "until interrupted. Each start is a fresh, empty cluster.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=cache_dir() / "dev-cluster",
        help="state directory: kubeconfig, certificates, etcd data, logs (default: %(default)s)",
    )
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="only build (or find cached) binaries and KubeRay CRDs, print their paths, exit",
    )
    args = parser.parse_args(argv)

    try:
        if args.build_only:
            _build_only()
        else:
            _serve(args.dir.resolve())
    except KeyboardInterrupt:
        print("\nDev cluster stopped.", flush=True)
    except (BuildError, ControlPlaneError, GoNotFoundError) as error:
        sys.exit(f"dev cluster failed: {error}")


def _build_only() -> None:
    started = time.monotonic()
    for path in ensure_binaries().all_files():
        print(path)
    print(f"binaries ready in {time.monotonic() - started:.2f}s", file=sys.stderr)


def _serve(state_dir: Path) -> None:
    started = time.monotonic()
    # SIGTERM (e.g. from a process manager) shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ControlPlane(state_dir=state_dir) as cluster:
        print(
            f"\nDev cluster ready in {time.monotonic() - started:.1f}s at {cluster.url}\n"
            f"  kubeconfig: {cluster.kubeconfig}\n"
            f"  logs:       {cluster.log_dir}\n"
            f"  kubectl:    {cluster.binaries.kubectl}\n"
            f"  helm:       {cluster.binaries.helm}\n\n"
            f"  export KUBECONFIG={cluster.kubeconfig}\n"
            f"  export PATH={cluster.binaries.bin_dir}:$PATH\n\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        while True:
            cluster.raise_if_exited()
            time.sleep(1)


if __name__ == "__main__":
    main()
