"""Run the operator against a local control plane, as the tests and benchmarks do.

The operator authenticates with the ServiceAccount and RBAC that the Helm chart renders, so anything the controller
calls without the chart granting it fails here as it would in a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from finetune_dev.controlplane import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "finetune-operator"
SOURCE_ROOTS = tuple(REPO_ROOT / room for room in ("api", "operator", "trainer", "dev"))
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def source_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout's packages first on PYTHONPATH, so subprocesses run this code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, SOURCE_ROOTS), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for a reaper do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def install_chart_rbac(
    control_plane: Any, release: str, namespace: str, executor: str, watch_namespaces: list[str]
) -> Path:
    """Apply the chart's ServiceAccount and RBAC (nothing else) and return a kubeconfig for that ServiceAccount."""
    args = [
        "template",
        release,
        str(CHART_DIR),
        "--namespace",
        namespace,
        "--set",
        f"executor={executor}",
    ]
    if watch_namespaces:
        args += ["--set", "watchNamespaces={" + ",".join(watch_namespaces) + "}"]
    rendered = control_plane.helm(*args).stdout
    items = [doc for doc in yaml.safe_load_all(rendered) if doc and doc.get("kind") in RBAC_KINDS]
    control_plane.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    account = next(item["metadata"]["name"] for item in items if item["kind"] == "ServiceAccount")
    kubeconfig = control_plane.service_account_kubeconfig(namespace, account)
    # RBAC reaches the authorizer through an informer: wait until the grant is visible.
    probe = ["auth", "can-i", "patch", "finetunejobs.finetune.dev/status", "-n", (watch_namespaces or [namespace])[0]]
    deadline = time.monotonic() + 30
    while control_plane.kubectl(*probe, kubeconfig=kubeconfig, check=False).stdout.strip() != "yes":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the chart's RBAC for {account} did not take effect")
        time.sleep(0.2)
    return kubeconfig


class OperatorProcess:
    """`python -m finetune_operator run` as a subprocess (so it can be killed and restarted like a real Pod)."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        executor: str = "kuberay",
        namespaces: tuple[str, ...] = (),
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        python: str = sys.executable,
        leader_election: bool = False,
    ):
        self.kubeconfig, self.log_path, self.executor = kubeconfig, log_path, executor
        self.leader_election = leader_election
        self.namespaces, self.state_dir, self.cwd, self.python = namespaces, state_dir, cwd, python
        self.env = source_env(**(env or {}))
        self.process: subprocess.Popen | None = None
        self.health_port = self.metrics_port = 0

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.health_port, self.metrics_port = free_port(), free_port()
        argv = [
            self.python,
            "-m",
            "finetune_operator",
            "run",
            "--executor",
            self.executor,
            "--leader-elect" if self.leader_election else "--no-leader-elect",
            "--kubeconfig",
            str(self.kubeconfig),
            "--health-port",
            str(self.health_port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        for namespace in self.namespaces:
            argv += ["--namespace", namespace]
        if self.state_dir is not None:
            argv += ["--state-dir", str(self.state_dir)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator was not healthy after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 80) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, as when a node dies."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
