"""What `finetune run` shows: the pipeline ETA, the plain lines off a terminal and the live view on one (a real pty)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import UTC, datetime, timedelta

import pytest
from stage_helpers import DATA, FAST_TRAINING, REPO, job_spec, source_env, write_manifest

from finetune_api.report import StageReport
from finetune_api.status import FineTuneJobStatus, StageStatus
from finetune_trainer.display import PlainDisplay, pipeline_eta


def status_of(*phases: str, finished_in: int = 100) -> FineTuneJobStatus:
    """A pipeline's status with stages in `phases`; the succeeded ones took `finished_in` seconds each."""
    stages = [StageStatus(name=f"s{i}", type="sft", phase=phase) for i, phase in enumerate(phases)]
    for stage in stages:
        if stage.phase == "Succeeded":
            start = datetime(2026, 1, 1, tzinfo=UTC)
            stage.start_time, stage.completion_time = (
                f"{moment:%Y-%m-%dT%H:%M:%SZ}" for moment in (start, start + timedelta(seconds=finished_in))
            )
    return FineTuneJobStatus(stages=stages, progress=f"{phases.count('Succeeded')}/{len(phases)}")


@pytest.mark.unit
def test_the_pipeline_eta_is_the_running_stages_plus_the_pending_ones_at_the_average_duration():
    running = StageReport(phase="Running", step=5, total_steps=20, eta_seconds=30.0)
    assert pipeline_eta(status_of("Succeeded", "Running", "Pending", "Pending", finished_in=120), running) == 270.0
    assert pipeline_eta(status_of("Succeeded", "Running"), running) == 30.0


@pytest.mark.unit
def test_the_pipeline_eta_is_unknown_until_the_running_stage_has_one_and_a_stage_finished():
    assert pipeline_eta(status_of("Running"), StageReport(phase="Running")) is None  # no step done yet
    assert pipeline_eta(status_of("Running"), None) is None
    with_eta = StageReport(phase="Running", step=5, total_steps=20, eta_seconds=30.0)
    assert pipeline_eta(status_of("Running", "Pending"), with_eta) is None  # how long a stage takes is not known yet
    assert pipeline_eta(status_of("Succeeded", "Succeeded"), None) == 0.0


@pytest.mark.unit
def test_a_plain_progress_line_has_step_loss_tokens_per_second_and_both_etas():
    out = io.StringIO()
    report = StageReport(phase="Running", step=10, total_steps=40, loss=2.5, eta_seconds=75.0, tokens_per_second=1234.5)
    PlainDisplay(out).update(status_of("Succeeded", "Running", finished_in=60), "s1", report)
    assert out.getvalue() == "[s1] step 10/40 loss 2.5000 1,234 tok/s eta 1:15 | pipeline eta 1:15\n"


def run_on_a_terminal(argv: list[str], timeout: float, rows: int = 40, columns: int = 160) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and everything it wrote."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**source_env(), "TERM": "xterm-256color"}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every holder of the terminal has closed it
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            process.kill()
            pytest.fail(f"{argv} ran past {timeout} s; its output so far:\n{output.decode(errors='replace')[-3000:]}")
    finally:
        os.close(leader)
    return process.wait(), output.decode(errors="replace")


def screen_lines(output: str) -> list[str]:
    """The lines drawn, without colours, cursor moves and column padding: every frame of the live view in turn."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    return [" ".join(line.split()) for line in re.split(r"\r\n|\r|\n", plain) if line.strip()]


@pytest.mark.train
def test_on_a_terminal_finetune_run_draws_a_live_progress_bar_and_ends_with_the_stage_table(tmp_path, tiny_model_dir):
    # Long enough (a few seconds on an idle machine) for reports, written at most once a second, to land mid-run.
    steps = 300
    stages = [{"name": "domain", "type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}}]
    training = {**FAST_TRAINING, "maxSteps": steps, "loggingSteps": 5}
    spec = job_spec(tiny_model_dir, tmp_path / "out", stages, training=training)
    manifest = write_manifest(tmp_path / "job.yaml", spec.model_dump(by_alias=True, exclude_none=True, mode="json"))
    argv = [sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-ray"]
    code, output = run_on_a_terminal(argv, timeout=300)
    assert code == 0, output[-3000:]
    lines = screen_lines(output)

    # A frame drawn while the stage trained: the bar, step/total, loss, tokens/s and the stage's ETA, then the
    # pipeline's ETA in the caption.
    bar = r"[━╸╺ ]+"
    running = re.compile(rf"domain cpt Running {bar} (\d+)/{steps} (\d+\.\d{{4}}) ([\d,]+) (\d+:\d\d)")
    frames = [(match, after) for line, after in zip(lines, lines[1:]) if (match := running.fullmatch(line))]
    # The last Running frames may show {steps}/{steps}: training is done, the held-out evaluation after it is not.
    frames = [(match, after) for match, after in frames if 0 < int(match[1]) < steps]
    assert frames, "\n".join(lines[-40:])
    match, caption = frames[-1]
    assert int(match[3].replace(",", "")) > 0, match[0]
    assert re.fullmatch(r"pipeline 0/1 eta \d+:\d\d", caption), caption
    assert "\x1b[" in output  # drawn in place (cursor moves and colours), not printed as plain lines

    # The live view's last frame stays on the screen, and the stage table follows it.
    assert any(
        re.fullmatch(rf"domain cpt Succeeded {bar} {steps}/{steps} \d+\.\d{{4}} [\d,]+ 0:00", line) for line in lines
    )
    assert "pipeline 1/1 eta 0:00" in lines
    table = lines.index(next(line for line in lines if line.startswith("STAGE")))
    assert lines[table].split() == ["STAGE", "TYPE", "PHASE", "DURATION", "METRICS", "CHECKPOINT"]
    assert lines[table + 1].split()[:3] == ["domain", "cpt", "Succeeded"]
    assert "eval_loss_after=" in lines[table + 1]
