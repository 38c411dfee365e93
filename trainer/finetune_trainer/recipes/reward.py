"""Reward model: a one-logit scoring head trained on preference pairs with the Bradley-Terry loss (TRL RewardTrainer).

Data: `prompt`/`chosen`/`rejected` text, or conversational `chosen`/`rejected` message lists that carry the prompt.
Held-out metrics are computed over every pair at once (not averaged per batch), since they feed the quality gate:
  eval_accuracy  fraction of held-out pairs scored chosen > rejected
  eval_margin    mean score(chosen) - score(rejected)
  eval_loss      mean Bradley-Terry loss, -log sigmoid(margin)
  eval_loss_before  the same loss for the untrained head (TRL's evaluation before the first step)
With LoRA the head is trained in full alongside the adapters (PEFT's SEQ_CLS task saves the `score` module), and the
saved model is merged, so AutoModelForSequenceClassification loads it directly.
"""

from __future__ import annotations

import torch
from trl import RewardConfig, RewardTrainer

from finetune_api.spec import RewardOptions
from finetune_trainer.errors import DataValidationError, QualityGateError
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import eval_loss_before

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
    if len(trainer.eval_dataset) == 0:
        # RewardTrainer drops pairs longer than max_length; without held-out pairs there is no accuracy to gate on.
        raise DataValidationError(
            f"stage {ctx.config.stage.name!r}: every held-out pair is longer than training.maxLength "
            f"({args.max_length} tokens); expected at least one held-out pair to evaluate the reward model on"
        )
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    margins = held_out_margins(trainer)
    metrics = {
        "eval_accuracy": (margins > 0).float().mean().item(),
        "eval_margin": margins.mean().item(),
        "eval_loss": -torch.nn.functional.logsigmoid(margins).mean().item(),
        "eval_loss_before": eval_loss_before(trainer),
    }
    ctx.log(
        f"held-out pairs: {len(margins)}, accuracy {metrics['eval_accuracy']:.3f}, margin {metrics['eval_margin']:.3f}"
    )
    guards.check_metrics(ctx.config, metrics)  # a diverged model fails as such, not as a low accuracy
    check_quality_gate(ctx, options, metrics["eval_accuracy"])
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics


@torch.no_grad()
def held_out_margins(trainer: RewardTrainer) -> torch.Tensor:
    """score(chosen) - score(rejected) for every held-out pair, gathered from all workers."""
    model = trainer.model
    model.eval()
    margins = []
    # Each collated batch holds its pairs' chosen sequences in the first half and their rejected ones in the second.
    for batch in trainer.get_eval_dataloader():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        chosen, rejected = scores.squeeze(-1).float().chunk(2)
        margins.append(trainer.accelerator.gather_for_metrics(chosen - rejected))
    return torch.cat(margins)


def check_quality_gate(ctx: StageContext, options: RewardOptions, accuracy: float) -> None:
    """Fail the stage, before anything is written as its output, when held-out accuracy is below the minimum."""
    required = options.min_reward_accuracy
    if required is not None and accuracy < required:
        raise QualityGateError(
            f"stage {ctx.config.stage.name!r}: held-out reward accuracy {accuracy:.3f} is below "
            f"reward.minRewardAccuracy {required:.3f}; the model was not saved as the stage output (checkpoints are kept)"
        )
