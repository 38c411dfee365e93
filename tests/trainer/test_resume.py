"""Resume: a stage killed mid-run (SIGKILL) continues from its checkpoint; Ctrl-C suspends `finetune run`, which resumes."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stage_helpers import DATA, job_spec, source_env, stage_command, write_manifest

from finetune_trainer import storage

pytestmark = [pytest.mark.train, pytest.mark.slow]


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
    complete = storage.list_checkpoints(config.checkpoint_dir)
    killed_at = complete[-1][0]
    assert first.returncode == -signal.SIGKILL
    assert killed_at < 60 and not storage.exists(config.output_uri), "the first run finished before it could be killed"
    report = json.loads((tmp_path / "first.json").read_text())
    # The kill may land between a checkpoint's completion marker and its report: the report names a complete
    # checkpoint, perhaps one behind, and the resume takes the latest complete one either way.
    assert report["phase"] == "Running" and report["lastCheckpoint"] in {uri for _, uri in complete}

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


def test_ctrl_c_suspends_finetune_run_and_running_it_again_resumes(tmp_path, tiny_model_dir):
    storage_dir = tmp_path / "out"
    stages = [{"name": "domain", "type": "cpt", "dataset": {"uri": str(DATA / "domain.txt")}}]
    spec = job_spec(
        tiny_model_dir, storage_dir, stages, training={"maxSteps": 60, "saveSteps": 5, "learningRate": 1e-3}
    )
    manifest = write_manifest(tmp_path / "job.yaml", spec.model_dump(by_alias=True, exclude_none=True, mode="json"))
    command = [sys.executable, "-m", "finetune_trainer", "run", str(manifest), "--no-ray"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, env=source_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    checkpoints = storage_dir / "domain" / "checkpoints"
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())) and time.monotonic() < deadline:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    status = json.loads((storage_dir / "status.json").read_text())
    suspended = {c["type"]: c for c in status["conditions"]}["Suspended"]
    assert status["phase"] == "Suspended" and (suspended["status"], suspended["reason"]) == ("True", "Suspended")
    assert status["stages"][0]["phase"] == "Suspended" and status["stages"][0]["attempts"] == 1

    second = subprocess.run(command, env=source_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Resumed: resumed: continuing from the latest checkpoint" in second.stdout
    # The trainer's own line, in the stage's log: the second attempt continued from the checkpoint.
    assert "resuming from" in (storage_dir / "domain" / "stage.log").read_text().split("==== attempt")[-1]
    final = json.loads((storage_dir / "status.json").read_text())
    conditions = {c["type"]: (c["status"], c["reason"]) for c in final["conditions"]}
    assert final["phase"] == "Succeeded" and conditions["Suspended"] == ("False", "Resumed")
