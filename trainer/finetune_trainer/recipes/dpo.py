"""Direct Preference Optimization (TRL DPOTrainer) on preference pairs.

Data: `prompt`/`chosen`/`rejected` text, or conversational `chosen`/`rejected` message lists that carry the prompt.
Reference model: with LoRA none is loaded; TRL keeps a frozen copy of the freshly initialised adapter, whose update is
zero, so the reference is exactly the input model and costs one adapter's memory rather than a second model. With full
fine-tuning the reference is a frozen copy of the input model.
Held-out metrics come from TRL's evaluation (implicit reward r = beta * log(pi / pi_ref) of each completion):
  eval_reward_accuracy  fraction of pairs with r(chosen) > r(rejected)   (TRL `rewards/accuracies`)
  eval_reward_margin    mean r(chosen) - r(rejected)                     (TRL `rewards/margins`)
  eval_loss             DPO loss
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from finetune_api.spec import DPOOptions
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import preference_metrics

ACCEPTED_COLUMNS = [("prompt", "chosen", "rejected"), ("chosen", "rejected")]


def run(ctx: StageContext) -> dict[str, float]:
    options = ctx.config.stage.dpo or DPOOptions()
    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    policy = ctx.causal_lm()
    reference = ctx.causal_lm(trainable=False) if ctx.config.peft.method == "full" else None
    args = ctx.training_args(
        DPOConfig,
        beta=options.beta,
        loss_type=[options.loss_type],
        label_smoothing=options.label_smoothing,
        eval_on_start=False,  # the policy starts as the reference: every implicit reward would be zero
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    metrics = preference_metrics(ctx, trainer)
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics
