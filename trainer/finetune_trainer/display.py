"""What `finetune run` shows while it runs: one live view on a terminal, plain lines at a steady rate elsewhere.

The stage processes' own output (the trainer, Ray, libraries) goes to each stage's `stage.log`; this shows the
pipeline as the status and the reports describe it: a progress bar per stage (step/total, loss, tokens/s, ETA) and an
estimate for the whole pipeline.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from finetune_api.report import StageReport
from finetune_api.status import FineTuneJobStatus, StagePhase
from finetune_api.timeutil import format_duration, seconds_between
from finetune_trainer.reporting import format_report, format_throughput

# Off a terminal (pods, CI, pipes), at most one progress line per stage this often.
PLAIN_INTERVAL_SECONDS = 10.0
# Event reasons worth a line of their own; the rest show up in the table and the status file.
SHOWN_EVENTS = {"StageStarting", "StageSucceeded", "AllStagesSucceeded", "Suspended", "Resumed"}


def pipeline_eta(status: FineTuneJobStatus, current: StageReport | None) -> float | None:
    """Seconds left for the whole pipeline: the running stage's ETA, plus the stages still to run at the average
    duration of those finished so far (unknown until the running stage has an ETA and one stage has finished)."""
    durations = [seconds_between(s.start_time, s.completion_time) for s in status.stages if s.phase == "Succeeded"]
    durations = [d for d in durations if d is not None]
    pending = sum(1 for s in status.stages if s.phase not in (StagePhase.succeeded.value, StagePhase.running.value))
    running = any(s.phase == StagePhase.running.value for s in status.stages)
    running_eta = current.eta_seconds if current is not None else None
    if (running and running_eta is None) or (pending and not durations):
        return None
    return (running_eta if running else 0.0) + pending * (sum(durations) / len(durations) if durations else 0.0)


class PlainDisplay:
    """Lines for logs: events as they happen, each stage's progress at most every PLAIN_INTERVAL_SECONDS."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.last: dict[str, float] = {}

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def event(self, reason: str, message: str, warning: bool) -> None:
        if warning or reason in SHOWN_EVENTS:
            print(f"{reason}: {message}", file=sys.stderr if warning else self.stream, flush=True)

    def update(self, status: FineTuneJobStatus, stage: str | None, report: StageReport | None) -> None:
        if stage is None or report is None or report.phase != "Running" or not report.total_steps:
            return
        now = time.monotonic()
        if now - self.last.get(stage, 0.0) < PLAIN_INTERVAL_SECONDS:
            return
        self.last[stage] = now
        eta = pipeline_eta(status, report)
        print(f"{format_report(stage, report)} | pipeline eta {format_duration(eta)}", file=self.stream, flush=True)


class LiveDisplay:
    """A rich live view: one progress bar per stage and the pipeline's ETA, redrawn in place."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console()
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.lines: list[str] = []

    def __enter__(self) -> LiveDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def event(self, reason: str, message: str, warning: bool) -> None:
        if warning or reason in SHOWN_EVENTS:
            self.console.print(f"[{'yellow' if warning else 'dim'}]{reason}[/]: {message}", highlight=False)

    def update(self, status: FineTuneJobStatus, stage: str | None, report: StageReport | None) -> None:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        for column in ("stage", "type", "phase", "progress", "step", "loss", "tokens/s", "eta"):
            table.add_column(column)
        for entry in status.stages:
            live = report if entry.name == stage and report is not None else None
            total = (live.total_steps if live else 0) or (entry.progress.total_steps if entry.progress else 0)
            done = (live.step if live else 0) or (entry.progress.step if entry.progress else 0)
            if entry.phase == StagePhase.succeeded.value:
                done = total = max(total, 1)
            loss = f"{live.loss:.4f}" if live and live.loss is not None else ""
            rate = format_throughput(live.tokens_per_second) if live and live.tokens_per_second is not None else ""
            eta = format_duration(live.eta_seconds) if live and live.eta_seconds is not None else ""
            bar = ProgressBar(total=max(total, 1), completed=done, width=30)
            step = f"{done}/{total}" if total else ""
            table.add_row(entry.name, entry.type, entry.phase or "Pending", bar, step, loss, rate, eta)
        table.caption = f"pipeline {status.progress or ''} eta {format_duration(pipeline_eta(status, report))}"
        self.live.update(table)


def make_display(interactive: bool | None = None) -> PlainDisplay | LiveDisplay:
    interactive = sys.stdout.isatty() if interactive is None else interactive
    return LiveDisplay() if interactive else PlainDisplay()


def tail(lines: Iterable[str], count: int) -> list[str]:
    kept: list[str] = []
    for line in lines:
        kept.append(line.rstrip("\n"))
        if len(kept) > count:
            del kept[0]
    return kept
