"""The same SFT stage on Ray Train: two CPU workers (gloo) with DeepSpeed ZeRO-2 learn, checkpoint and report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from stage_helpers import DATA, source_env, stage_command

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
        stage_command(config, report, no_ray=False),
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


def test_sft_on_two_ray_workers_with_zero3(render, tmp_path):
    # ZeRO-3 partitions the weights while they load (deepspeed.zero.Init), which needs DeepSpeed's own comm layer to
    # know the world that Ray Train's process group spans; without it every rank assumes a world of one.
    config = render(
        {"type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        resources={"workers": 2},
        deepspeed={"zeroStage": 3},
        training={"maxSteps": 10, "saveSteps": 10, "learningRate": 2e-3},
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer.stage",
            "--config-file",
            str(config_file),
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
    assert "world_size=2" in output
    final = json.loads(report.read_text())
    assert final["phase"] == "Succeeded" and final["step"] == 10
    assert final["metrics"]["eval_loss_after"] < final["metrics"]["eval_loss_before"]
    # The saved model is whole (gathered from both ranks' partitions), not two empty shards: the trained weights that
    # DeepSpeed's engine consolidated into the last checkpoint, at the same step.
    import torch
    from safetensors.torch import load_file

    weights = load_file(Path(config.output_uri) / "model.safetensors")
    assert weights and all(tensor.numel() > 0 for tensor in weights.values())
    consolidated = load_file(Path(config.checkpoint_dir) / "checkpoint-10" / "model.safetensors")
    assert weights.keys() == consolidated.keys()
    assert all(torch.equal(weights[name], consolidated[name]) for name in weights)
