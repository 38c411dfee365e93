"""Odds Ratio Preference Optimization (TRL's experimental ORPOTrainer): SFT and preference learning in one loss,
with no reference model.

Data: `prompt`/`chosen`/`rejected` text, or conversational `chosen`/`rejected` message lists that carry the prompt.
Held-out metrics come from TRL's evaluation, where ORPO's reward is beta times the length-normalised log-probability of
a completion under the policy (there is no reference):
  eval_reward_accuracy  fraction of pairs with reward(chosen) > reward(rejected)   (TRL `rewards/accuracies`)
  eval_reward_margin    mean reward(chosen) - reward(rejected)                    (TRL `rewards/margins`)
  eval_loss             ORPO loss (NLL of chosen + beta * odds-ratio term)
  eval_loss_before      the same loss for the input model (TRL's evaluation before the first step)
"""

from __future__ import annotations

from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from finetune_api.spec import ORPOOptions
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import eval_loss_before, preference_metrics

ACCEPTED_COLUMNS = [("prompt", "chosen", "rejected"), ("chosen", "rejected")]


def run(ctx: StageContext) -> dict[str, float]:
    options = ctx.config.stage.orpo or ORPOOptions()
    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    args = ctx.training_args(ORPOConfig, beta=options.beta)
    trainer = ORPOTrainer(
        model=ctx.causal_lm(),
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    metrics = {**preference_metrics(ctx, trainer), "eval_loss_before": eval_loss_before(trainer)}
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics
