"""PPO/GRPO stage configuration and input checks that fail before any model is loaded or step is taken."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_api.manifest import ManifestError, parse_manifest
from finetune_api.render import render_stage
from finetune_api.spec import FineTuneJobSpec, PPOOptions, TrainingSpec
from finetune_trainer.errors import ConfigError, DataValidationError
from finetune_trainer.recipes import grpo, ppo
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.rl.loop import PPOPlan

pytestmark = pytest.mark.unit

MANIFEST = """\
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: rlhf
spec:
  model:
    source: /models/tiny
  storage:
    uri: /tmp/out
  stages:
    - name: sft
      type: sft
      dataset:
        uri: examples/data/instruct.jsonl
    - name: rm
      type: reward
      dataset:
        uri: examples/data/prefs.jsonl
    - name: ppo
      type: ppo
      rewardFrom: {reward_from}
      dataset:
        uri: examples/data/prompts.jsonl
"""


def test_reward_from_must_name_an_earlier_stage():
    with pytest.raises(ManifestError) as failure:
        parse_manifest(MANIFEST.format(reward_from="judge"), "rlhf.yaml")
    assert "rlhf.yaml:21: spec.stages[2].rewardFrom: 'judge' is not an earlier stage (earlier stages: sft, rm)" in str(
        failure.value
    )


def test_reward_from_must_name_a_reward_stage():
    with pytest.raises(ManifestError) as failure:
        parse_manifest(MANIFEST.format(reward_from="sft"), "rlhf.yaml")
    assert "rlhf.yaml:21: spec.stages[2].rewardFrom: stage 'sft' has type sft, expected a reward stage" in str(
        failure.value
    )


def test_reward_from_a_reward_stage_is_accepted():
    job = parse_manifest(MANIFEST.format(reward_from="rm"), "rlhf.yaml")
    config = render_stage(job.metadata.name, job.spec, "ppo")
    assert config.reward_model == "/tmp/out/rm/model"
    assert config.training.learning_rate == 1e-5  # the adapter PPO default


def _context(tmp_path: Path, stage_type: str, prompts: str, options: dict | None = None) -> StageContext:
    data = tmp_path / "prompts.jsonl"
    data.write_text(prompts)
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"source": str(tmp_path / "no-model")},
            "storage": {"uri": str(tmp_path / "out")},
            "stages": [
                {"name": "rm", "type": "reward", "dataset": {"uri": str(data)}},
                {
                    "name": "rl",
                    "type": stage_type,
                    "rewardFrom": "rm",
                    "dataset": {"uri": str(data)},
                    stage_type: options or {},
                },
            ],
        }
    )
    return StageContext(render_stage("job", spec, "rl"), None, rank=0, world_size=1, work_dir=tmp_path / "work")


@pytest.mark.parametrize("recipe", [ppo, grpo], ids=["ppo", "grpo"])
def test_prompt_data_with_the_wrong_column_is_rejected_naming_the_field(tmp_path, recipe):
    ctx = _context(
        tmp_path,
        recipe.__name__.rsplit(".", 1)[-1],
        '{"question": "What is 3 plus 4?"}\n{"question": "What is 1 plus 1?"}\n',
    )
    with pytest.raises(DataValidationError) as failure:
        recipe.run(ctx)
    message = str(failure.value)
    assert "stage 'rl'" in message and "prompts.jsonl:line 1" in message
    assert "found columns {question}" in message and "expected columns {prompt}" in message


def test_grpo_group_size_must_divide_the_generation_batch(tmp_path):
    ctx = _context(tmp_path, "grpo", '{"prompt": "What is 3 plus 4?"}\n', options={"numGenerations": 3})
    with pytest.raises(ConfigError, match=r"grpo.numGenerations 3 must divide the 8 completions generated per step"):
        grpo.run(ctx)


def test_ppo_plan_splits_rollouts_into_mini_and_micro_batches():
    plan = PPOPlan.build(
        "ppo", PPOOptions(rollout_batch_size=32, mini_batches=2), TrainingSpec(batch_size=6, epochs=2.0), 100, 2
    )
    # 16 prompts per worker, mini-batches of 8, micro-batches of 4 (the largest divisor of 8 within batchSize 6).
    assert (plan.rollout_per_worker, plan.mini_batch, plan.micro_batch, plan.accumulation) == (16, 8, 4, 2)
    assert plan.total_steps == 7  # ceil(100 prompts x 2 epochs / 32)
    assert PPOPlan.build("ppo", PPOOptions(total_episodes=50), TrainingSpec(batch_size=8), 100, 1).total_steps == 4
    assert PPOPlan.build("ppo", PPOOptions(), TrainingSpec(batch_size=8, max_steps=3), 100, 1).total_steps == 3


@pytest.mark.parametrize(
    ("options", "workers", "problem"),
    [
        ({"rollout_batch_size": 10}, 4, r"ppo.rolloutBatchSize 10 must be a multiple of the 4 workers"),
        (
            {"rollout_batch_size": 12, "mini_batches": 5},
            1,
            r"ppo.miniBatches 5 must divide the 12 prompts each worker rolls out",
        ),
    ],
)
def test_ppo_plan_rejects_uneven_batches(options, workers, problem):
    with pytest.raises(ConfigError, match=problem):
        PPOPlan.build("ppo", PPOOptions(**options), TrainingSpec(batch_size=8), 100, workers)
