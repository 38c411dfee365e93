"""The same SFT stage on Ray Train: two CPU workers (gloo) with DeepSpeed ZeRO-2 learn, checkpoint and report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from stage_helpers import DATA, source_env

pytestmark = [pytest.mark.train, pytest.mark.slow]


def test_sft_on_two_ray_workers_with_zero2(render, tmp_path):
    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        resources={"workers": 2},
        deepspeed={"zeroStage": 2},
        training={"maxSteps": 20, "saveSteps": 10, "learningRate": 2e-3},
    )
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.stage",
            "--config-json",
            config.model_dump_json(),
            "--report",
            f"file://{report}",
        ],
        env=source_env(RAY_USAGE_STATS_ENABLED="0"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 worker(s) on Ray" in output and "world_size=2" in output
    final = json.loads(report.read_text())
    assert final["phase"] == "Succeeded" and final["step"] == 20
    assert final["metrics"]["eval_loss_after"] < final["metrics"]["eval_loss_before"] - 1.0
    # ZeRO-2 shards optimizer state per rank: both ranks' shards are in the synced checkpoint.
    shards = sorted(p.name for p in (Path(config.checkpoint_dir) / "checkpoint-20").rglob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1]
    assert (Path(config.output_uri) / "model.safetensors").exists()
