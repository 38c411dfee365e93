"""PPO (RLHF) against the pipeline's reward model: our own loop, since TRL no longer ships one (see docs/ppo.md).

Models:
  policy     the previous stage's output (LoRA by default), trained
  reference  the policy with its adapter disabled under LoRA, else a frozen copy
  value      a sequence classifier read at every token, initialised from the reward model (`valueInit: reward`) or from
             the policy's weights with a new head (`valueInit: policy`), trained
  reward     the `rewardFrom` stage's output, frozen; scores the last token of each (prompt, response)
Data: `prompt` rows (text, or a list of chat messages rendered with the chat template); the held-out split is the
evaluation set.
Status metrics, on the held-out prompts (one sampled completion each, at most 64 prompts): reward_mean_first /
reward_mean_last (mean reward-model score of the input / trained policy), kl_mean (mean per-sequence KL of the trained
policy to the reference), eval_prompts. From the training rollouts: train_reward_mean_first / train_reward_mean_last
(mean score over the first / last 20% of PPO steps), train_kl_mean, kl_last (the last step's KL), ppo_steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from finetune_api.spec import PPOOptions
from finetune_trainer import modeling, strategy
from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.rl.engines import DeepSpeedEngine, TorchEngine, deepspeed_batch_config
from finetune_trainer.rl.loop import PPOHooks, PPOLoop, PPOPlan
from finetune_trainer.rl.models import TokenScorer, disable_dropout, freeze, same_tokenizer
from finetune_trainer.rl.rollout import RewardScorer

ACCEPTED_COLUMNS = [("prompt",)]


def run(ctx: StageContext) -> dict[str, float]:
    loop = build_loop(ctx)
    resume_from = ctx.resume_checkpoint()
    if resume_from:
        loop.resume(Path(resume_from))
    metrics = loop.run()
    ctx.log(
        "PPO done: held-out reward {reward_mean_first:.3f} -> {reward_mean_last:.3f}, kl_mean {kl_mean:.3f} "
        "({eval_prompts:.0f} prompts); training reward {train_reward_mean_first:.3f} -> {train_reward_mean_last:.3f}, "
        "kl_last {kl_last:.3f}".format(**metrics)
    )
    ctx.log("time: " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in loop.timings.items()))
    ctx.save_final(loop.policy.module, loop.tokenizer, metrics)
    return metrics


def build_loop(ctx: StageContext) -> PPOLoop:
    """Models, engines and data for this stage, ready to run."""
    config = ctx.config
    options = config.stage.ppo or PPOOptions()
    stage = config.stage.name
    data = ctx.data(ACCEPTED_COLUMNS)
    prompts = list(data.train["prompt"])
    plan = PPOPlan.build(stage, options, config.training, len(prompts), ctx.world_size)

    tokenizer = ctx.tokenizer()
    reward_tokenizer = ctx.tokenizer(config.reward_model)
    shared_vocabulary = same_tokenizer(tokenizer, reward_tokenizer)
    if options.value_init == "reward" and not shared_vocabulary:
        raise ConfigError(
            f"stage {stage!r}: ppo.valueInit 'reward' needs the reward model ({config.reward_model}) to share the policy's "
            "tokenizer, because the value model reads the policy's tokens; set ppo.valueInit to 'policy'"
        )
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.gpu else torch.device("cpu")
    ctx.log(
        f"PPO: {plan.total_steps} steps x {options.rollout_batch_size} prompts, {options.ppo_epochs} epochs x {options.mini_batches} "
        f"mini-batches, micro-batch {plan.micro_batch}; reward model {config.reward_model}"
        + ("" if shared_vocabulary else " (own tokenizer: responses are re-tokenized for scoring)")
    )

    policy_model = ctx.causal_lm()
    if any(name.endswith("ForSequenceClassification") for name in policy_model.config.architectures or []):
        raise ConfigError(
            f"stage {stage!r}: the input model {config.input_model} is a sequence classifier (a reward model?), "
            "expected a causal language model to use as the policy"
        )
    uses_adapter = config.peft.method != "full"
    reference = None if uses_adapter else freeze(ctx.causal_lm(trainable=False)).to(device)
    value_source = config.reward_model if options.value_init == "reward" else None
    value_model = TokenScorer(ctx.sequence_classifier(value_source, trainable=True))
    reward_model = freeze(TokenScorer(ctx.sequence_classifier(config.reward_model, trainable=False))).to(device)
    for model in (policy_model, value_model):
        disable_dropout(model)
        if config.training.gradient_checkpointing:
            model_to_checkpoint = model.classifier if isinstance(model, TokenScorer) else model
            model_to_checkpoint.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    updates = plan.total_steps * options.ppo_epochs * plan.optimizer_updates_per_step
    policy, value = (make_engine(ctx, model, updates, plan, device) for model in (policy_model, value_model))

    def checkpoint_saved(step: int, local: Path) -> None:
        ctx.checkpoint_saved(local, step)
        # The synced copy is the durable one; keep only the newest local checkpoint.
        for older in local.parent.glob("checkpoint-*"):
            if older != local and ctx.local_rank == 0:
                shutil.rmtree(older, ignore_errors=True)

    return PPOLoop(
        stage=stage,
        options=options,
        training=config.training,
        plan=plan,
        policy=policy,
        value=value,
        reference=reference,
        reward=RewardScorer(
            reward_model, reward_tokenizer, tokenizer, config.training.max_length or 512, plan.micro_batch
        ),
        tokenizer=tokenizer,
        stop_token_ids=modeling.stop_token_ids(tokenizer, policy.module),
        prompts=prompts,
        eval_prompts=list(data.eval["prompt"]),
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=device,
        checkpoint_root=ctx.work_dir / "checkpoints",
        hooks=PPOHooks(log=ctx.log, progress=ctx.report_progress, checkpoint_saved=checkpoint_saved),
    )


def make_engine(ctx: StageContext, model: torch.nn.Module, updates: int, plan: PPOPlan, device: torch.device):
    """DeepSpeed when ZeRO is on or several workers must average gradients; plain PyTorch in a lone process."""
    training = ctx.config.training
    base = strategy.deepspeed_config(ctx.config.deepspeed)
    if base is None and ctx.world_size == 1:
        return TorchEngine(model.to(device), training, updates, plan.accumulation)
    ds_config = deepspeed_batch_config(
        base or {"zero_optimization": {"stage": 0}}, plan.micro_batch, plan.accumulation, ctx.world_size, ctx.precision
    )
    return DeepSpeedEngine(model, training, updates, plan.accumulation, ds_config)
