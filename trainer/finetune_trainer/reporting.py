"""The progress channel: StageReport snapshots to a file, a ConfigMap or the console, and the HF callback feeding it.

Reporters are plain picklable objects (they travel to Ray workers); clients are created lazily in the process that
writes. Only rank 0 reports.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from finetune_api.report import REPORT_KEY, StageReport
from finetune_api.timeutil import format_duration, now_rfc3339


class Reporter(Protocol):
    def publish(self, report: StageReport, *, urgent: bool = False) -> None:
        """Deliver a full snapshot; `urgent` bypasses throttling (checkpoints, final states)."""


class _Throttled:
    """Drops non-urgent snapshots that arrive within `min_interval` seconds of the last one written."""

    min_interval = 0.0

    def __init__(self) -> None:
        self._last_write = 0.0

    def publish(self, report: StageReport, *, urgent: bool = False) -> None:
        now = time.monotonic()
        if not urgent and now - self._last_write < self.min_interval:
            return
        self._last_write = now
        self._write(report)

    def _write(self, report: StageReport) -> None:
        raise NotImplementedError

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_client")}


class FileReporter(_Throttled):
    """Writes the report JSON to a file, atomically (write then rename)."""

    def __init__(self, path: str | Path, min_interval: float = 1.0):
        super().__init__()
        self.path = Path(path)
        self.min_interval = min_interval

    def _write(self, report: StageReport) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(report.to_wire(), indent=2))
        partial.replace(self.path)


FINAL_REPORT_ATTEMPTS = 5
# (connect, read) seconds per API request: a slow API server delays a report, never training.
REQUEST_TIMEOUT = (5.0, 15.0)
# Where the kubelet mounts the pod's ServiceAccount token (what `load_incluster_config` reads).
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def in_cluster_token_problem() -> str | None:
    """Why the report channel cannot authenticate from inside a pod, or None."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not IN_CLUSTER_TOKEN.exists():
        return (
            f"no ServiceAccount token at {IN_CLUSTER_TOKEN}: the pod runs with automountServiceAccountToken: false "
            "(set on the pod or its ServiceAccount, or by a policy), so the trainer cannot report to its ConfigMap"
        )
    return None


class ConfigMapReporter(_Throttled):
    """Patches `data["report.json"]` of the per-stage ConfigMap the operator created.

    Progress goes out from a background thread (the latest snapshot wins), so rank 0 never holds up a collective on
    a slow API server; the final report is sent in the caller's thread, after anything pending, and retried.
    The trainer's service account may only get/patch that ConfigMap, never create one, so a missing ConfigMap is
    logged and skipped rather than created.
    """

    def __init__(self, namespace: str, name: str, min_interval: float = 5.0):
        super().__init__()
        self.namespace, self.name = namespace, name
        self.min_interval = min_interval
        self._start_sender()

    def _start_sender(self) -> None:
        self._sender_state = threading.Condition()
        self._pending: StageReport | None = None
        self._sending = False
        self._sender: threading.Thread | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k in ("namespace", "name", "min_interval")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._last_write = 0.0
        self._start_sender()

    def _api(self):
        if getattr(self, "_client", None) is None:
            from kubernetes import client, config

            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
            else:
                config.load_kube_config()
            self._client = client.CoreV1Api()
        return self._client

    def _write(self, report: StageReport) -> None:
        if report.phase == "Running":
            with self._sender_state:
                self._pending = report
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send_pending, name="report-sender", daemon=True)
                    self._sender.start()
                self._sender_state.notify_all()
            return
        # Progress may be dropped, but the final report is what the operator records as the stage's result: retry it.
        self.flush()
        self._send(report, FINAL_REPORT_ATTEMPTS)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until the pending progress report is sent (or given up on)."""
        with self._sender_state:
            self._sender_state.wait_for(lambda: self._pending is None and not self._sending, timeout)

    def _send_pending(self) -> None:
        while True:
            with self._sender_state:
                self._sender_state.wait_for(lambda: self._pending is not None)
                report, self._pending, self._sending = self._pending, None, True
            try:
                self._send(report, 1)
            finally:
                with self._sender_state:
                    self._sending = False
                    self._sender_state.notify_all()

    def _send(self, report: StageReport, attempts: int) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        body = {"data": {REPORT_KEY: json.dumps(report.to_wire())}}
        for attempt in range(1, attempts + 1):
            try:
                self._api().patch_namespaced_config_map(
                    self.name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT
                )
                return
            except (ApiException, HTTPError) as exc:
                detail = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else type(exc).__name__
                print(
                    f"warning: cannot patch ConfigMap {self.namespace}/{self.name} (try {attempt}/{attempts}): {detail}",
                    file=sys.stderr,
                )
                if attempt < attempts:
                    time.sleep(2 ** (attempt - 1))


class ConsoleReporter:
    """Human-readable progress lines: stage, step/total, loss, tokens/s, ETA."""

    def __init__(self, stage: str, min_interval: float = 2.0):
        self.stage = stage
        self.min_interval = min_interval
        self._last = 0.0

    def publish(self, report: StageReport, *, urgent: bool = False) -> None:
        now = time.monotonic()
        if report.phase == "Running" and not urgent and now - self._last < self.min_interval:
            return
        self._last = now
        print(format_report(self.stage, report), flush=True)


class TeeReporter:
    """Sends every snapshot to several reporters."""

    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def publish(self, report: StageReport, *, urgent: bool = False) -> None:
        for reporter in self.reporters:
            reporter.publish(report, urgent=urgent)


def format_report(stage: str, report: StageReport) -> str:
    if report.phase == "Failed":
        return f"[{stage}] failed: {report.reason}: {report.message}"
    if report.phase == "Succeeded":
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(report.metrics.items()))
        return f"[{stage}] succeeded {metrics}"
    if report.message and not report.total_steps:
        return f"[{stage}] {report.message}"
    loss = f" loss {report.loss:.4f}" if report.loss is not None else ""
    rate = f" {format_throughput(report.tokens_per_second)} tok/s" if report.tokens_per_second is not None else ""
    saved = f" saved {report.last_checkpoint}" if report.message == "checkpoint" else ""
    eta = format_duration(report.eta_seconds)
    return f"[{stage}] step {report.step}/{report.total_steps}{loss}{rate} eta {eta}{saved}"


def format_throughput(tokens_per_second: float) -> str:
    return f"{tokens_per_second:,.0f}"


def reporter_from_url(url: str) -> Reporter:
    """`configmap://NAMESPACE/NAME` or `file:///PATH` (a bare path also works)."""
    if url.startswith("configmap://"):
        namespace, _, name = url.removeprefix("configmap://").partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"report URL {url!r} must look like configmap://NAMESPACE/NAME")
        problem = in_cluster_token_problem()
        if problem:
            raise ValueError(problem)
        return ConfigMapReporter(namespace, name)
    return FileReporter(url.removeprefix("file://"))


class MetricsHistory:
    """`metrics.jsonl`: one JSON line per logged step (training and held-out evaluation), the stage's curves.

    Each line has `step`, `epoch` (when known), `time` (RFC 3339) and the step's finite numeric values, e.g.
    `{"step": 10, "epoch": 0.5, "time": "...", "loss": 2.1, "learning_rate": 0.001}`; the final line has `final: true`
    and the stage's final metrics.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, step: int, values: dict[str, Any], epoch: float | None = None, **flags: bool) -> None:
        numbers = {
            key: float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        }
        line = {"step": step, **({"epoch": round(epoch, 4)} if epoch is not None else {}), "time": now_rfc3339()}
        with self.path.open("a") as out:
            out.write(json.dumps({**line, **numbers, **flags}) + "\n")


class ReportChannel:
    """Holds the running StageReport and publishes snapshots of it. Disabled (a no-op) on ranks other than 0."""

    def __init__(
        self, reporter: Reporter | None, attempt: int, enabled: bool = True, history: MetricsHistory | None = None
    ):
        self.reporter = reporter
        self.enabled = enabled and reporter is not None
        self.history = history if enabled else None
        self.report = StageReport(phase="Running", attempt=attempt)

    def record(self, step: int, values: dict[str, Any], epoch: float | None = None) -> None:
        """One logged step into metrics.jsonl (progress snapshots are throttled; the history keeps every step)."""
        if self.history is not None:
            self.history.append(step, values, epoch)

    def _publish(self, urgent: bool) -> None:
        if self.enabled:
            self.report.updated_at = now_rfc3339()
            self.reporter.publish(self.report.model_copy(), urgent=urgent)

    def started(self, message: str = "started") -> None:
        self.report.message = message
        self._publish(urgent=True)

    def progress(
        self,
        step: int,
        total: int,
        loss: float | None = None,
        epoch: float | None = None,
        eta: float | None = None,
        tokens_per_second: float | None = None,
        **metrics: float,
    ) -> None:
        self.report.step, self.report.total_steps, self.report.epoch, self.report.eta_seconds = step, total, epoch, eta
        if loss is not None:
            self.report.loss = loss
        if tokens_per_second is not None:
            self.report.tokens_per_second = tokens_per_second
        self.report.metrics.update({k: float(v) for k, v in metrics.items()})
        self.report.message = ""
        self._publish(urgent=False)

    def checkpoint(self, uri: str, step: int) -> None:
        self.report.last_checkpoint, self.report.step = uri, step
        self.report.message = "checkpoint"
        self._publish(urgent=True)

    def succeeded(self, metrics: dict[str, float], output_uri: str) -> None:
        self.report.phase, self.report.checkpoint = "Succeeded", output_uri
        # The stage's final metrics only: the last progress snapshot's per-step stats are not results.
        self.report.metrics = dict(metrics)
        self.report.eta_seconds, self.report.message = 0.0, "stage finished"
        self._publish(urgent=True)

    def failed(self, reason: str, message: str) -> None:
        self.report.phase, self.report.reason, self.report.message = "Failed", reason, message
        self._publish(urgent=True)


class TokenRate:
    """Training throughput: the tokens trained between two logs over the wall time between them.

    `mark(tokens)` starts the clock at a running count of trained tokens; each `rate(tokens)` measures the interval
    since the previous mark or rate and starts the next one. None when nothing was measured yet, or when no token was
    counted: a trainer that does not count its tokens shows no throughput rather than zero.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last: tuple[float, int] | None = None

    @property
    def started(self) -> bool:
        return self.last is not None

    def mark(self, tokens: int) -> None:
        self.last = (self.clock(), tokens)

    def rate(self, tokens: int) -> float | None:
        previous, now = self.last, self.clock()
        self.last = (now, tokens)
        if previous is None or now <= previous[0] or tokens <= previous[1]:
            return None
        return (tokens - previous[1]) / (now - previous[0])


def progress_callback(channel: ReportChannel, checkpoint_saved):
    """An HF TrainerCallback: progress (step/total, loss, tokens/s, ETA) on every log, and each saved checkpoint.

    Throughput counts `state.num_input_tokens_seen` (summed over ranks; kept only with
    `include_num_input_tokens_seen`, which `StageContext.training_args` sets, or by trainers that count their own
    tokens, as GRPO does) from the first step on, so the evaluation before it is not training time.
    `checkpoint_saved(local_dir, step)` runs on every rank (ranks may hold their own shards); it syncs and reports.
    """
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started_at, self.first_step = time.monotonic(), state.global_step
            self.tokens = TokenRate()

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.tokens.started:
                self.tokens.mark(state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            tokens_per_second = self.tokens.rate(state.num_input_tokens_seen) if "loss" in logs else None
            if tokens_per_second is not None:
                logs["tokens_per_second"] = tokens_per_second  # the trackers after this callback log it too
            channel.record(state.global_step, logs, state.epoch)
            if "loss" not in logs:
                return
            done = state.global_step - self.first_step
            eta = (
                (time.monotonic() - self.started_at) / done * (state.max_steps - state.global_step)
                if done > 0
                else None
            )
            channel.progress(
                state.global_step,
                state.max_steps,
                loss=float(logs["loss"]),
                epoch=state.epoch,
                eta=eta,
                tokens_per_second=tokens_per_second,
            )

        def on_save(self, args, state, control, **kwargs):
            local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint_saved(local, state.global_step)

    return ProgressCallback()


def tensorboard_callback(log_dir: Path):
    """transformers' TensorBoardCallback writing to `log_dir`, every writer to a file of its own.

    The callback closes its writer when training ends and opens another for the evaluation after it. tensorboardX
    names both `events.out.tfevents.<second>.<host>` and opens with "wb" (tensorboardX/record_writer.py), so a second
    writer within the same second truncated the training curves; a per-process, per-writer suffix keeps them apart.
    """
    from transformers.integrations import TensorBoardCallback

    class SeparateFilesTensorBoardCallback(TensorBoardCallback):
        def __init__(self) -> None:
            super().__init__()
            self.logging_dir, self.writers = str(log_dir), 0

        def _init_summary_writer(self, args):
            self.writers += 1
            suffix = f".{os.getpid()}.{self.writers}"
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, filename_suffix=suffix)

    return SeparateFilesTensorBoardCallback()


def mlflow_callback():
    """transformers' MLflowCallback with a run that spans the stage rather than its training alone.

    The HF callback ends its run when training ends, so the held-out evaluation after it would log into another run,
    one that mlflow starts unasked and leaves open. This one keeps its run until `end_run`, called as the stage ends.
    """
    from transformers.integrations import MLflowCallback

    class StageMLflowCallback(MLflowCallback):
        def on_train_end(self, args, state, control, **kwargs):
            pass  # the evaluation after training belongs to the same run: `end_run` ends it

        def end_run(self, failed: bool) -> None:
            if self._auto_end_run and self._ml_flow.active_run():
                self._ml_flow.end_run("FAILED" if failed else "FINISHED")

    return StageMLflowCallback()


def build_tracker_callbacks(trackers: list[str], tensorboard_dir: Path) -> list:
    """One HF TrainerCallback per experiment tracker (`training.reportTo`); each writes from rank 0 only."""
    from transformers.integrations import WandbCallback

    makers = {
        "tensorboard": lambda: tensorboard_callback(tensorboard_dir),
        "mlflow": mlflow_callback,
        "wandb": WandbCallback,
    }
    return [makers[tracker]() for tracker in trackers]


class TrackerFeed:
    """A custom training loop's logs into the trackers' HF callbacks, called as an HF Trainer calls them.

    The callbacks get a minimal TrainerState (the step and the planned steps) and the `args` TrainingArguments, which
    they record as the run's parameters. Rank 0 only.
    """

    def __init__(self, callbacks: list, args):
        from transformers import TrainerControl, TrainerState

        self.callbacks, self.args = callbacks, args
        self.state, self.control = TrainerState(), TrainerControl()
        self.begun = False

    def _call(self, event: str, **kwargs) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self.args, self.state, self.control, **kwargs)

    def log(self, step: int, total: int, logs: dict[str, float]) -> None:
        self.state.global_step, self.state.max_steps = step, total
        if not self.begun:
            self.begun = True
            self._call("on_train_begin")
        self._call("on_log", logs=dict(logs))

    def end(self) -> None:
        if self.begun:
            self._call("on_train_end")
