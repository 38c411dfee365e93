"""`finetune dev-cluster` / `make dev-cluster`: a local control plane in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from .binaries import BuildError, GoNotFoundError, cache_dir, ensure_binaries, ensure_component
from .controlplane import COMPONENTS, ControlPlane, ControlPlaneError


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
        "--with",
        dest="components",
        action="append",
        default=[],
        choices=[*COMPONENTS, "all"],
        help="also run this neighbour (repeatable; `all` for every one), built from its pinned Go module on first use",
    )
    parser.add_argument(
        "--gpu-nodes",
        type=int,
        default=0,
        metavar="N",
        help="with kwok: create N fake GPU nodes (8 x nvidia.com/gpu, tainted nvidia.com/gpu:NoSchedule, "
        "label finetune.dev/pool=gpu) and one plain node",
    )
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="only build (or find cached) binaries and KubeRay CRDs, print their paths, exit",
    )
    args = parser.parse_args(argv)
    components = list(COMPONENTS) if "all" in args.components else args.components
    if args.gpu_nodes and "kwok" not in components:
        parser.error("--gpu-nodes needs --with kwok (nodes without KWOK never become Ready)")

    try:
        if args.build_only:
            _build_only(components)
        else:
            _serve(args.dir.resolve(), components, args.gpu_nodes)
    except KeyboardInterrupt:
        print("\nDev cluster stopped.", flush=True)
    except (BuildError, ControlPlaneError, GoNotFoundError) as error:
        sys.exit(f"dev cluster failed: {error}")


def _build_only(components: list[str]) -> None:
    started = time.monotonic()
    for path in ensure_binaries().all_files():
        print(path)
    for name in components:
        for path in ensure_component(name).all_files():
            print(path)
    print(f"binaries ready in {time.monotonic() - started:.2f}s", file=sys.stderr)


def _serve(state_dir: Path, components: list[str], gpu_nodes: int) -> None:
    started = time.monotonic()
    # SIGTERM (e.g. from a process manager) shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ControlPlane(state_dir=state_dir, components=components) as cluster:
        if gpu_nodes:
            for index in range(gpu_nodes):
                cluster.create_node(f"gpu-{index}", gpus=8, labels={"finetune.dev/pool": "gpu"})
            cluster.create_node("cpu-0")
        running = ", ".join(cluster.components) or "none (apiserver and etcd only)"
        print(
            f"\nDev cluster ready in {time.monotonic() - started:.1f}s at {cluster.url}\n"
            f"  kubeconfig: {cluster.kubeconfig}\n"
            f"  logs:       {cluster.log_dir}\n"
            f"  kubectl:    {cluster.binaries.kubectl}\n"
            f"  helm:       {cluster.binaries.helm}\n"
            f"  neighbours: {running}\n\n"
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
