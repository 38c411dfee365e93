"""Direct Preference Optimization (TRL DPOTrainer) on preference pairs.

Data: `prompt`/`chosen`/`rejected` text, or conversational `chosen`/`rejected` message lists that carry the prompt.
Reference model: with LoRA none is loaded; TRL keeps a frozen copy of the freshly initialised adapter, whose update is
zero, so the reference is exactly the input model and costs one adapter's memory rather than a second model. With full
fine-tuning the reference is a frozen copy of the input model.
Held-out metrics are computed over every held-out pair once (not TRL's per-batch means), with the implicit reward
r = beta * log(pi / pi_ref) of each completion:
  eval_reward_accuracy  fraction of pairs with r(chosen) > r(rejected)
  eval_reward_margin    mean r(chosen) - r(rejected)
  eval_loss_before      DPO loss of the input model (log 2 for the sigmoid loss: policy and reference agree)
  eval_loss_after       DPO loss after training
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from finetune_api.spec import DPOOptions
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import (
    completion_logps,
    eval_loss,
    eval_loss_before,
    gather_held_out,
    pair_metrics,
)

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
    guards.check_rows_left(ctx.config, trainer, len(data.train), len(data.eval))
    trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())

    metrics = {
        **pair_metrics(ctx, *held_out_rewards(trainer)),
        "eval_loss_before": eval_loss_before(trainer),
        "eval_loss_after": eval_loss(trainer),
    }
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics


def held_out_rewards(trainer: DPOTrainer):
    """Implicit rewards (chosen, rejected) of every held-out pair."""

    def rewards(batch):
        chosen, rejected = completion_logps(trainer.model, batch).chunk(2)  # batches hold [chosen..., rejected...]
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:  # TRL's own reference pass: the frozen model, or the policy with its reference adapter
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model or trainer.model, batch)
        return trainer.beta * (chosen - ref_chosen), trainer.beta * (rejected - ref_rejected)

    return gather_held_out(trainer, rewards)
