"""Reward model: a one-logit scoring head trained on preference pairs with the Bradley-Terry loss (TRL RewardTrainer).

Data: `prompt`/`chosen`/`rejected` text, or conversational `chosen`/`rejected` message lists that carry the prompt.
Held-out metrics are computed over every pair once (not averaged per batch), since they feed the quality gate:
  eval_reward_accuracy  fraction of held-out pairs scored chosen > rejected
  eval_reward_margin    mean score(chosen) - score(rejected)
  eval_loss_before      mean Bradley-Terry loss, -log sigmoid(margin), of the untrained head (TRL's first evaluation)
  eval_loss_after       the same loss after training
With LoRA the head is trained in full alongside the adapters (PEFT's SEQ_CLS task saves the `score` module), and the
saved model is merged, so AutoModelForSequenceClassification loads it directly.
"""

from __future__ import annotations

import torch
from trl import RewardConfig, RewardTrainer

from finetune_api.spec import RewardOptions
from finetune_trainer.errors import QualityGateError
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import eval_loss_before, gather_held_out, pair_metrics

ACCEPTED_COLUMNS = [("prompt", "chosen", "rejected"), ("chosen", "rejected")]


def run(ctx: StageContext) -> dict[str, float]:
    options = ctx.config.stage.reward or RewardOptions()
    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    model = ctx.sequence_classifier()
    args = ctx.training_args(
        RewardConfig,
        center_rewards_coefficient=options.center_rewards_coefficient,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    guards.check_rows_left(ctx.config, trainer, len(data.train), len(data.eval))
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    chosen, rejected = held_out_scores(trainer)
    metrics = {
        **pair_metrics(ctx, chosen, rejected),
        "eval_loss_before": eval_loss_before(trainer),
        "eval_loss_after": -torch.nn.functional.logsigmoid(chosen - rejected).mean().item(),
    }
    guards.check_metrics(ctx.config, metrics)  # a diverged model fails as such, not as a low accuracy
    check_quality_gate(ctx, options, metrics["eval_reward_accuracy"])
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics


def held_out_scores(trainer: RewardTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """score(chosen), score(rejected) of every held-out pair."""

    def scores(batch):
        # Each collated batch holds its pairs' chosen sequences in the first half and their rejected ones in the second.
        logits = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        return logits.squeeze(-1).chunk(2)

    chosen, rejected = gather_held_out(trainer, scores)
    return chosen, rejected


def check_quality_gate(ctx: StageContext, options: RewardOptions, accuracy: float) -> None:
    """Fail the stage, before anything is written as its output, when held-out accuracy is below the minimum."""
    required = options.min_reward_accuracy
    if required is not None and accuracy < required:
        raise QualityGateError(
            f"stage {ctx.config.stage.name!r}: held-out reward accuracy {accuracy:.3f} is below "
            f"reward.minRewardAccuracy {required:.3f}; the model was not saved as the stage output (checkpoints are kept)"
        )
