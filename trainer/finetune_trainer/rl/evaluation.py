"""Held-out evaluation of an RL policy: one completion per held-out prompt, scored with the stage's reward and compared
with the reference model, for the input policy (before training) and the trained one (after).

Completions are sampled with the stage's generation settings (temperature, top-p, `maxNewTokens`, stopping at eos or
the chat template's end of turn) from a fixed seed, so that the KL estimate is the one the stage trains with (an
expectation over the policy's own samples) and a rerun gives the same numbers. At most `HELD_OUT_PROMPTS` prompts are
evaluated, one generation each.

Every worker evaluates its share of the prompts (every `world_size`-th one, padded to the same length on every worker
so that all run the same number of forward passes, as ZeRO-3 needs) and the per-prompt values are gathered back in
prompt order: each held-out prompt counts exactly once, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from finetune_trainer.rl import core
from finetune_trainer.rl.rollout import Prompt, PromptBatch, batched_logprobs, chunks

HELD_OUT_PROMPTS = 64  # cap on the held-out prompts evaluated (the first ones of the held-out split)


@dataclass(frozen=True)
class HeldOutScores:
    """Means over the evaluated held-out prompts."""

    reward: float  # raw reward (reward-model score), as the reward model gives it
    kl: float  # per-sequence KL to the reference (the sum of the per-token estimates over the completion)
    length: float  # completion tokens
    prompts: int  # held-out prompts evaluated

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict[str, float]) -> HeldOutScores:
        return cls(float(state["reward"]), float(state["kl"]), float(state["length"]), int(state["prompts"]))

    def describe(self) -> str:
        return f"{self.prompts} prompts, reward {self.reward:.3f}, kl {self.kl:.4f}, length {self.length:.1f}"


def rank_share(count: int, rank: int, world_size: int) -> list[int]:
    """Indices of the prompts worker `rank` evaluates: rank, rank + world_size, ...; every worker gets
    ceil(count / world_size) of them, the last few repeating earlier prompts (dropped again by `gather_shares`)."""
    per_worker = math.ceil(count / world_size)
    return [(i * world_size + rank) % count for i in range(per_worker)]


def gather_shares(values: torch.Tensor, count: int, world_size: int) -> torch.Tensor:
    """Every worker's `[per_worker, k]` rows (of the prompts `rank_share` gave it) as `[count, k]` in prompt order."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        parts = [torch.empty_like(values) for _ in range(world_size)]
        dist.all_gather(parts, values.contiguous())
        # Row i of worker r is prompt i * world_size + r: interleave, then drop the padding at the end.
        values = torch.stack(parts, dim=1).reshape(-1, *values.shape[1:])
    return values[:count]


def evaluate_prompts(
    prompts: Sequence[Prompt],
    per_batch: Callable[[list[Prompt]], torch.Tensor],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """`per_batch(prompts)` (a `[len(prompts), k]` tensor) over every prompt once, gathered from all workers.

    Each batch samples from its own fixed seed; the caller's random state is left as it was.
    """
    if not prompts:
        raise ValueError("no held-out prompts to evaluate")
    share = [prompts[i] for i in rank_share(len(prompts), rank, world_size)]
    rows = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for index, part in enumerate(chunks(len(share), batch_size)):
            torch.manual_seed(seed * 1_000_003 + index * world_size + rank)
            rows.append(per_batch(share[part]).to(device=device, dtype=torch.float64))
    return gather_shares(torch.cat(rows), len(prompts), world_size)


def summarise(values: torch.Tensor) -> HeldOutScores:
    """Columns reward, kl, length of `evaluate_prompts`' result, averaged."""
    reward, kl, length = values.mean(dim=0).tolist()
    return HeldOutScores(reward=reward, kl=kl, length=length, prompts=values.shape[0])


@torch.no_grad()
def sequence_kl(
    policy: nn.Module,
    reference: Callable[[], AbstractContextManager[nn.Module]],
    batch: PromptBatch,
    responses: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    estimator: str,
    clamp: float,
    micro: int,
) -> torch.Tensor:
    """Per-sequence KL(policy || reference): the per-token estimate (`core.kl_estimate`) summed over each response.

    `reference()` enters the reference model (`rl.models.reference_of`: under LoRA, the policy with its adapter
    switched off), only once the policy's own log-probabilities are computed.
    """
    input_ids = torch.cat([batch.input_ids, responses], dim=1)
    attention = torch.cat([batch.attention_mask, mask.long()], dim=1)
    query_length = batch.input_ids.shape[1]
    logprobs = batched_logprobs(policy, input_ids, attention, query_length, temperature, micro)
    with reference() as reference_model:
        ref_logprobs = batched_logprobs(reference_model, input_ids, attention, query_length, temperature, micro)
    return core.kl_estimate(logprobs, ref_logprobs, estimator, clamp).masked_fill(~mask, 0.0).sum(dim=1)
