"""PPO arithmetic on tensors: masks, KL estimates, per-token rewards, GAE, whitening and the clipped losses.

Shapes: `[batch, response_len]` unless noted. A response mask is true on the tokens the policy chose, up to and
including the first stop token; everything after it is padding and must not influence any statistic.
Semantics follow TRL's PPOv2 trainer (and OpenRLHF where PPOv2 has none); deviations are noted where they occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Numerical guard of PPOv2 for temperature scaling: logits / (T + 1e-7).
TEMPERATURE_EPS = 1e-7


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            return torch.zeros((), dtype=values.dtype, device=values.device)
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries (and zero mean when shift_mean); padding comes back as 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask.bool(), 0.0)


StopTokens = int | list[int] | None  # one id, every id that ends a turn (eos and the chat template's), or none


def is_stop(responses: torch.Tensor, stop_token_ids: StopTokens) -> torch.Tensor:
    if isinstance(stop_token_ids, int):
        return responses == stop_token_ids
    return torch.isin(responses, torch.tensor(stop_token_ids, device=responses.device))


def response_mask_after_stop(responses: torch.Tensor, stop_token_ids: StopTokens) -> torch.Tensor:
    """True up to and including the first stop token of each row; all true for rows that never stop."""
    if stop_token_ids is None:
        return torch.ones_like(responses, dtype=torch.bool)
    stop = is_stop(responses, stop_token_ids).long()
    # Number of stop tokens strictly before each position: 0 means the position is at or before the first stop.
    stops_before = torch.cumsum(stop, dim=1) - stop
    return stops_before == 0


def truncate_after_stop(
    responses: torch.Tensor, stop_token_ids: StopTokens, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every token after the first stop token with padding. Returns (truncated responses, response mask)."""
    mask = response_mask_after_stop(responses, stop_token_ids)
    return responses.masked_fill(~mask, pad_token_id), mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true entry per row (0 for an all-false row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def contains_stop(responses: torch.Tensor, stop_token_ids: StopTokens) -> torch.Tensor:
    if stop_token_ids is None:
        return torch.ones(responses.shape[0], dtype=torch.bool, device=responses.device)
    return is_stop(responses, stop_token_ids).any(dim=1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / (T + eps)); logits `[B, T, V]`, tokens `[B, T]`."""
    scaled = logits.float() / (temperature + TEMPERATURE_EPS)
    return torch.gather(F.log_softmax(scaled, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token entropy of softmax(logits / (T + eps))."""
    scaled = logits.float() / (temperature + TEMPERATURE_EPS)
    probs = F.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: float) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens (http://joschu.net/blog/kl-approx.html).

    k1 = log(p/q): unbiased, high variance, can be negative. k3 = (q/p - 1) - log(q/p): unbiased, always >= 0.
    Clamped to +-clamp as OpenRLHF does, so one wild token cannot dominate the reward.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")
    return kl.clamp(min=-clamp, max=clamp)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """-beta * KL on every response token, plus the sequence score on its last (non-pad) token.

    PPOv2 adds the score one position past the last token (its `sequence_lengths_p1`), which lands on padding for
    truncated rows; we place it on the last real token, as OpenRLHF does and as the value mask assumes.
    """
    rewards = (-kl_coef * kl).masked_fill(~mask.bool(), 0.0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over each response. Returns (advantages, returns = advantages + values).

    Padding positions carry no reward and no value, so the bootstrap value after the last real token is 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, advantages + values


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> PolicyLoss:
    """PPO surrogate: mean over response tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl)


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range_value: float
) -> ValueLoss:
    """0.5 * mean over response tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return ValueLoss(loss=loss, clipfrac=clipfrac)
