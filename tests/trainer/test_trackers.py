"""metrics.jsonl and the experiment trackers: every logged step is kept, TensorBoard writes under the stage."""

from __future__ import annotations

import json

import pytest
from stage_helpers import DATA

from finetune_trainer.errors import ConfigError

pytestmark = pytest.mark.train


def test_cpt_keeps_every_logged_step_and_writes_tensorboard_under_the_stage(render, run_in_process, tmp_path):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
        training={"maxSteps": 6, "loggingSteps": 2, "reportTo": ["tensorboard"]},
    )
    metrics, _ = run_in_process(config)
    stage_dir = tmp_path / "artifacts" / "cpt"
    history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "loss" in row and not row.get("final")] == [2, 4, 6]
    # Throughput counts the attention mask: full 64-token blocks, 16 a step, until the short block at the data's end.
    assert [row["num_input_tokens_seen"] for row in history if "loss" in row] == [2048, 4096, 6096]
    assert all(row["tokens_per_second"] > 0 for row in history if "loss" in row)
    assert any("eval_loss" in row for row in history)  # held-out evaluations are logged steps too
    assert history[-1]["final"] and history[-1]["eval_loss_after"] == pytest.approx(metrics["eval_loss_after"])
    events = list((stage_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert any(b"train/loss" in event.read_bytes() for event in events), events
    assert any(b"train/tokens_per_second" in event.read_bytes() for event in events), events


def test_a_tracker_whose_package_is_missing_is_a_config_error_naming_the_field(render, run_in_process):
    config = render(
        {"type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
        training={"maxSteps": 2, "reportTo": ["wandb"]},
    )
    with pytest.raises(ConfigError, match=r"spec.training.reportTo: 'wandb' needs the wandb package"):
        run_in_process(config)
