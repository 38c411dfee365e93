"""A stage killed mid-run (SIGKILL after its first checkpoint) resumes from that checkpoint when restarted."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stage_helpers import DATA, source_env

from finetune_trainer import storage

pytestmark = [pytest.mark.train, pytest.mark.slow]


def stage_command(config, report: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "finetune_trainer.stage",
        "--config-json",
        config.model_dump_json(),
        "--report",
        f"file://{report}",
        "--no-ray",
    ]


def test_sigkilled_stage_resumes_from_its_latest_checkpoint(render, tmp_path):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}},
        training={"maxSteps": 60, "saveSteps": 5, "loggingSteps": 5, "learningRate": 1e-3},
    )
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        stage_command(config, tmp_path / "first.json"), env=source_env(), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not storage.list_checkpoints(config.checkpoint_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = storage.list_checkpoints(config.checkpoint_dir)[-1][0]
    assert first.returncode == -signal.SIGKILL
    assert killed_at < 60 and not storage.exists(config.output_uri), "the first run finished before it could be killed"
    report = json.loads((tmp_path / "first.json").read_text())
    assert report["phase"] == "Running" and report["lastCheckpoint"].endswith(f"checkpoint-{killed_at}")

    second = subprocess.run(
        stage_command(config, tmp_path / "second.json"), env=source_env(), capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming from {config.checkpoint_dir}/checkpoint-{killed_at} (step {killed_at})" in second.stdout
    steps = [int(s) for s in re.findall(r"\[cpt\] step (\d+)/60", second.stdout)]
    assert steps and min(steps) > killed_at and max(steps) == 60  # continued, not restarted from step 0
    final = json.loads((tmp_path / "second.json").read_text())
    assert final["phase"] == "Succeeded" and final["metrics"]["eval_loss_after"] < final["metrics"]["eval_loss_before"]
    state = json.loads((Path(config.checkpoint_dir) / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    # The log history spans both runs: the first run's early steps survived the restart.
    assert min(entry["step"] for entry in state["log_history"] if "loss" in entry) <= killed_at
