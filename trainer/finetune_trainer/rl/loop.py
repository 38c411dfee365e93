"""The PPO loop (PPOv2 semantics): rollout -> rewards -> GAE -> `ppo_epochs` passes of clipped updates, repeated.

One PPO step = one rollout of `rolloutBatchSize` prompts (split evenly across workers) and its updates. Everything
that must agree across workers (KL coefficient, the KL gate, logged statistics) uses values averaged over workers.
Before the first step and after the last, the policy is evaluated on the held-out prompts (`rl.evaluation`).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedTokenizerBase

from finetune_api.spec import PPOOptions, TrainingSpec
from finetune_trainer.errors import ConfigError, KLLimitError
from finetune_trainer.recipes.guards import diverged, non_finite
from finetune_trainer.reporting import TokenRate
from finetune_trainer.rl import core
from finetune_trainer.rl.engines import Engine
from finetune_trainer.rl.evaluation import (
    HELD_OUT_PROMPTS,
    HeldOutScores,
    evaluate_prompts,
    sequence_kl,
    summarise,
)
from finetune_trainer.rl.kl import KLController, RunningMoments
from finetune_trainer.rl.models import reference_of
from finetune_trainer.rl.rollout import (
    Prompt,
    PromptBatch,
    RewardScorer,
    Rollout,
    batched_logprobs,
    batched_token_scores,
    chunks,
    encode_prompts,
    response_logits,
    sample_completions,
)
from finetune_trainer.storage import CHECKPOINT_COMPLETE_FILE

STATE_FILE = CHECKPOINT_COMPLETE_FILE  # written last: its presence marks a complete checkpoint
FIRST_LAST_FRACTION = 0.2


@dataclass(frozen=True)
class PPOPlan:
    """Batch geometry, fixed before the first step."""

    total_steps: int
    rollout_per_worker: int
    mini_batch: int  # per worker
    micro_batch: int
    accumulation: int  # micro-batches per optimizer step

    @property
    def optimizer_updates_per_step(self) -> int:
        return self.rollout_per_worker // self.mini_batch

    @classmethod
    def build(
        cls, stage: str, options: PPOOptions, training: TrainingSpec, num_prompts: int, world_size: int
    ) -> PPOPlan:
        field_path = f"stage {stage!r}: ppo"
        if options.rollout_batch_size % world_size:
            raise ConfigError(
                f"{field_path}.rolloutBatchSize {options.rollout_batch_size} must be a multiple of the {world_size} workers"
            )
        per_worker = options.rollout_batch_size // world_size
        if per_worker % options.mini_batches:
            raise ConfigError(
                f"{field_path}.miniBatches {options.mini_batches} must divide the {per_worker} prompts each worker rolls out per step"
            )
        mini_batch = per_worker // options.mini_batches
        # The largest micro-batch within training.batchSize that splits a mini-batch evenly.
        micro_batch = max(d for d in range(1, min(mini_batch, training.batch_size or 8) + 1) if mini_batch % d == 0)
        if training.max_steps:
            total_steps = training.max_steps
        else:
            episodes = options.total_episodes or math.ceil(num_prompts * (training.epochs or 1.0))
            total_steps = math.ceil(episodes / options.rollout_batch_size)
        return cls(total_steps, per_worker, mini_batch, micro_batch, mini_batch // micro_batch)


@dataclass
class PPOState:
    step: int = 0
    kl: KLController = field(default_factory=lambda: KLController(0.0))
    score_moments: RunningMoments = field(default_factory=RunningMoments)
    score_history: list[float] = field(default_factory=list)
    kl_history: list[float] = field(default_factory=list)
    held_out_before: HeldOutScores | None = None  # the input policy on the held-out prompts

    def to_json(self) -> dict[str, Any]:
        return {
            "global_step": self.step,
            "kl_controller": self.kl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "score_history": self.score_history,
            "kl_history": self.kl_history,
            "held_out_before": self.held_out_before.to_json() if self.held_out_before else None,
        }

    def load_json(self, state: dict[str, Any]) -> None:
        self.step = int(state["global_step"])
        self.kl.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.score_history, self.kl_history = list(state["score_history"]), list(state["kl_history"])
        before = state.get("held_out_before")
        self.held_out_before = HeldOutScores.from_json(before) if before else None


@dataclass
class PPOHooks:
    log: Callable[[str], None]
    progress: Callable[..., None]  # (step, total, loss=None, tokens_per_second=None, **extra)
    checkpoint_saved: Callable[[int, Path], None]  # after every worker wrote its part of checkpoint-<step>


class PPOLoop:
    def __init__(
        self,
        *,
        stage: str,
        options: PPOOptions,
        training: TrainingSpec,
        plan: PPOPlan,
        policy: Engine,  # around the causal LM
        value: Engine,  # around a TokenScorer
        reference: nn.Module | None,  # None: the policy with its adapter disabled
        reward: RewardScorer,
        tokenizer: PreTrainedTokenizerBase,
        stop_token_ids: list[int],  # eos and the chat template's end-of-turn tokens (modeling.stop_token_ids)
        prompts: list[Prompt],
        eval_prompts: list[Prompt],  # the held-out prompts (at most HELD_OUT_PROMPTS are evaluated)
        rank: int,
        world_size: int,
        device: torch.device,
        checkpoint_root: Path,
        hooks: PPOHooks,
    ):
        self.stage, self.options, self.training, self.plan = stage, options, training, plan
        self.policy, self.value, self.reference, self.reward = policy, value, reference, reward
        self.tokenizer, self.prompts = tokenizer, prompts
        self.eval_prompts = list(eval_prompts)[:HELD_OUT_PROMPTS]
        # A response ends at eos or at the chat template's end of turn, whichever comes first.
        self.stop_token_ids = stop_token_ids
        self.rank, self.world_size, self.device = rank, world_size, device
        self.checkpoint_root, self.hooks = checkpoint_root, hooks
        self.max_prompt_tokens = max(1, (training.max_length or 512) - options.max_new_tokens)
        self.seed = training.seed if training.seed is not None else 42
        self.state = PPOState(kl=KLController(options.kl_coef, options.kl_target, options.kl_horizon))
        self.timings = {"generation": 0.0, "scoring": 0.0, "optimisation": 0.0, "evaluation": 0.0}
        # Throughput: the rollouts' non-padding tokens (prompts and responses) over all workers, each counted once
        # however many PPO epochs train on it, as TRL's GRPO counts its generations.
        self.tokens_seen = 0
        self.token_rate = TokenRate()

    # -- data -------------------------------------------------------------------------------------------------------
    def prompts_for_step(self, step: int) -> list[Prompt]:
        """This worker's share of step `step`: a deterministic function of the step, so resuming needs no loader state."""
        size = self.options.rollout_batch_size
        start = step * size + self.rank * self.plan.rollout_per_worker
        picked = []
        for episode in range(start, start + self.plan.rollout_per_worker):
            epoch, index = divmod(episode, len(self.prompts))
            order = list(range(len(self.prompts)))
            random.Random(self.seed + epoch).shuffle(order)
            picked.append(self.prompts[order[index]])
        return picked

    def global_mean(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor.tolist()

    # -- rollout ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's completions of `batch`: responses, their mask, and which ones stopped on their own."""
        options = self.options
        self.policy.module.eval()  # generation with a KV cache, even when gradient checkpointing is on
        with self.policy.gathered() as policy:
            return sample_completions(
                policy,
                batch,
                temperature=options.temperature,
                top_p=options.top_p,
                max_new_tokens=options.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_token_ids=self.stop_token_ids,
            )

    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> Rollout:
        options, micro = self.options, self.plan.micro_batch
        started = time.perf_counter()
        responses, mask, finished = self.sample(batch)
        self.timings["generation"] += time.perf_counter() - started

        started = time.perf_counter()
        input_ids = torch.cat([batch.input_ids, responses], dim=1)
        attention = torch.cat([batch.attention_mask, mask.long()], dim=1)
        query_length = batch.input_ids.shape[1]
        logprobs = batched_logprobs(self.policy, input_ids, attention, query_length, options.temperature, micro)
        with reference_of(self.policy.module, self.reference) as reference:
            ref_logprobs = batched_logprobs(reference, input_ids, attention, query_length, options.temperature, micro)
        values = batched_token_scores(self.value, input_ids, attention, micro)[:, query_length - 1 : -1]
        raw_scores = self.reward(batch, responses, mask, finished)
        self.timings["scoring"] += time.perf_counter() - started

        scores = self.shape_scores(raw_scores, finished)
        kl = core.kl_estimate(logprobs, ref_logprobs, options.kl_estimator, options.kl_clamp).masked_fill(~mask, 0.0)
        rewards = core.per_token_rewards(scores, kl, self.state.kl.value, mask)
        if options.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae_advantages(
            rewards, values.masked_fill(~mask, 0.0), mask, options.gamma, options.lam
        )
        return Rollout(
            query_ids=batch.input_ids,
            query_mask=batch.attention_mask,
            responses=responses,
            response_mask=mask,
            logprobs=logprobs.masked_fill(~mask, 0.0),
            values=values.masked_fill(~mask, 0.0),
            raw_scores=raw_scores,
            kl=kl,
            advantages=core.masked_whiten(advantages, mask),
            returns=returns,
        )

    def shape_scores(self, scores: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Missing-EOS penalty, then running normalisation, then clipping (each only when configured)."""
        options = self.options
        scores = scores.clone()
        if options.missing_eos_penalty is not None:
            scores[~finished] -= options.missing_eos_penalty
        if options.normalize_reward:
            mean, mean_sq = self.global_mean([scores.mean().item(), (scores**2).mean().item()])
            self.state.score_moments.update(mean, max(mean_sq - mean**2, 0.0), scores.numel() * self.world_size)
            scores = (scores - self.state.score_moments.mean) / self.state.score_moments.std
        if options.reward_clip is not None:
            scores = scores.clamp(-options.reward_clip, options.reward_clip)
        return scores

    # -- optimisation -----------------------------------------------------------------------------------------------
    def optimise(self, rollout: Rollout, step: int) -> dict[str, float]:
        options, plan = self.options, self.plan
        query_length = rollout.query_ids.shape[1]
        generator = torch.Generator().manual_seed(self.seed * 7919 + step)
        totals: dict[str, float] = {
            "policy_loss": 0.0,
            "value_loss": 0.0,
            "entropy": 0.0,
            "clipfrac": 0.0,
            "approx_kl": 0.0,
            "value_clipfrac": 0.0,
        }
        count = 0
        self.policy.module.train()
        self.value.module.train()
        started = time.perf_counter()
        for _ in range(options.ppo_epochs):
            order = torch.randperm(plan.rollout_per_worker, generator=generator)
            for mini in chunks(plan.rollout_per_worker, plan.mini_batch):
                for micro in chunks(plan.mini_batch, plan.micro_batch):
                    batch = rollout.select(order[mini][micro])
                    mask = batch.response_mask
                    logits = response_logits(self.policy, batch.input_ids, batch.attention_mask, query_length)
                    logprobs = core.logprobs_of(logits, batch.responses, options.temperature)
                    policy_loss = core.clipped_policy_loss(
                        logprobs, batch.logprobs, batch.advantages, mask, options.clip_range
                    )
                    self.policy.backward(policy_loss.loss)
                    values = self.value(batch.input_ids, batch.attention_mask)[:, query_length - 1 : -1]
                    value_loss = core.clipped_value_loss(
                        values, batch.values, batch.returns, mask, options.clip_range_value
                    )
                    self.value.backward(options.vf_coef * value_loss.loss)
                    self.policy.step()
                    self.value.step()
                    with torch.no_grad():
                        totals["policy_loss"] += policy_loss.loss.item()
                        totals["value_loss"] += value_loss.loss.item()
                        totals["entropy"] += core.masked_mean(core.entropy_of(logits, options.temperature), mask).item()
                        totals["clipfrac"] += policy_loss.clipfrac.item()
                        totals["approx_kl"] += policy_loss.approx_kl.item()
                        totals["value_clipfrac"] += value_loss.clipfrac.item()
                    count += 1
        self.timings["optimisation"] += time.perf_counter() - started
        return {key: value / count for key, value in totals.items()}

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        directory = self.checkpoint_root / f"checkpoint-{self.state.step}"
        self.policy.save(directory / "policy")
        self.value.save(directory / "value")
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            (directory / STATE_FILE).write_text(json.dumps(self.state.to_json(), indent=1))
        self.hooks.checkpoint_saved(self.state.step, directory)

    def resume(self, directory: Path) -> None:
        saved = json.loads((directory / STATE_FILE).read_text())
        if saved.get("held_out_before") is None:
            # A checkpoint without the input policy's held-out scores: measure them before its weights load.
            saved["held_out_before"] = self.evaluate_held_out("before").to_json()
        self.policy.load(directory / "policy")
        self.value.load(directory / "value")
        self.state.load_json(saved)
        self.hooks.log(f"resumed PPO from {directory.name} (step {self.state.step}, kl_coef {self.state.kl.value:.4g})")

    # -- the loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        plan, options, state = self.plan, self.options, self.state
        save_every = self.training.save_steps or 50
        log_every = self.training.logging_steps or 5
        if state.held_out_before is None:
            state.held_out_before = self.evaluate_held_out("before")
        self.token_rate.mark(self.tokens_seen)
        while state.step < plan.total_steps:
            torch.manual_seed(self.seed * 1_000_003 + state.step * self.world_size + self.rank)
            batch = encode_prompts(self.tokenizer, self.prompts_for_step(state.step), self.max_prompt_tokens)
            batch.input_ids, batch.attention_mask = (
                batch.input_ids.to(self.device),
                batch.attention_mask.to(self.device),
            )
            rollout = self.rollout(batch)
            mask = rollout.response_mask
            score, kl, length, finished, tokens = self.global_mean(
                [
                    rollout.raw_scores.mean().item(),
                    (rollout.kl * mask).sum(dim=1).mean().item(),
                    mask.sum(dim=1).float().mean().item(),
                    core.contains_stop(rollout.responses, self.stop_token_ids).float().mean().item(),
                    float(rollout.query_mask.sum().item() + mask.sum().item()),
                ]
            )
            if options.max_kl is not None and kl > options.max_kl:
                raise KLLimitError(
                    f"stage {self.stage!r}: mean KL to the reference {kl:.4f} exceeds ppo.maxKl {options.max_kl:g} at PPO step {state.step + 1}"
                )
            local_stats = self.optimise(rollout, state.step)
            stats = dict(zip(local_stats, self.global_mean(list(local_stats.values()))))
            bad = non_finite({**stats, "score": score, "kl": kl})  # global means: every rank fails together
            if bad:
                found = ", ".join(f"{key} {value}" for key, value in sorted(bad.items()))
                raise diverged(self.stage, self.training.learning_rate, f"{found} at PPO step {state.step + 1}")
            state.kl.update(kl, options.rollout_batch_size)
            state.score_history.append(score)
            state.kl_history.append(kl)
            state.step += 1
            self.tokens_seen += round(tokens * self.world_size)
            if state.step % log_every == 0 or state.step == plan.total_steps:
                reported = ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")
                self.hooks.progress(
                    state.step,
                    plan.total_steps,
                    loss=stats["policy_loss"] + options.vf_coef * stats["value_loss"],
                    tokens_per_second=self.token_rate.rate(self.tokens_seen),
                    score=score,
                    kl=kl,
                    kl_coef=state.kl.value,
                    response_length=length,
                    **{key: stats[key] for key in reported},
                )
                self.hooks.log(
                    f"ppo step {state.step}/{plan.total_steps}: score {score:.3f} kl {kl:.3f} beta {state.kl.value:.4f} "
                    f"policy_loss {stats['policy_loss']:.4f} value_loss {stats['value_loss']:.4f} entropy {stats['entropy']:.3f} "
                    f"clipfrac {stats['clipfrac']:.3f} approx_kl {stats['approx_kl']:.5f} value_clipfrac {stats['value_clipfrac']:.3f} "
                    f"response_length {length:.1f} eos {finished:.2f} lr {self.policy.learning_rate():.3g}"
                )
            if state.step % save_every == 0 and state.step < plan.total_steps:
                self.save_checkpoint()
        return self.metrics(state.held_out_before, self.evaluate_held_out("after"))

    # -- held-out evaluation ----------------------------------------------------------------------------------------
    def evaluate_held_out(self, when: str) -> HeldOutScores:
        """The current policy on the held-out prompts: one sampled completion each, its raw reward-model score and its
        per-sequence KL to the reference (the stage's estimator), every prompt counted once over all workers."""
        options, micro = self.options, self.plan.micro_batch

        def per_batch(prompts: list[Prompt]) -> torch.Tensor:
            batch = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
            batch.input_ids, batch.attention_mask = (
                batch.input_ids.to(self.device),
                batch.attention_mask.to(self.device),
            )
            responses, mask, finished = self.sample(batch)
            scores = self.reward(batch, responses, mask, finished)
            kl = sequence_kl(
                self.policy,
                lambda: reference_of(self.policy.module, self.reference),
                batch,
                responses,
                mask,
                temperature=options.temperature,
                estimator=options.kl_estimator,
                clamp=options.kl_clamp,
                micro=micro,
            )
            return torch.stack([scores.float(), kl.float(), mask.sum(dim=1).float()], dim=1)

        started = time.perf_counter()
        values = evaluate_prompts(
            self.eval_prompts,
            per_batch,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.plan.rollout_per_worker,
            seed=self.seed + 1,
            device=self.device,
        )
        self.timings["evaluation"] += time.perf_counter() - started
        scores = summarise(values)
        self.hooks.log(f"held-out evaluation {when} training: {scores.describe()}")
        return scores

    def metrics(self, before: HeldOutScores, after: HeldOutScores) -> dict[str, float]:
        scores, kls = self.state.score_history, self.state.kl_history
        window = max(1, round(FIRST_LAST_FRACTION * len(scores)))
        return {
            "reward_mean_first": before.reward,
            "reward_mean_last": after.reward,
            "kl_mean": after.kl,
            "eval_prompts": float(after.prompts),
            "train_reward_mean_first": sum(scores[:window]) / window,
            "train_reward_mean_last": sum(scores[-window:]) / window,
            "train_kl_mean": sum(kls) / len(kls),
            "kl_last": kls[-1],
            "ppo_steps": float(len(scores)),
        }
