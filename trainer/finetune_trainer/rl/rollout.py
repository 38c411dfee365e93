"""One PPO rollout: sample responses, score them, and turn scores into advantages (all without gradients)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from finetune_trainer.rl import core
from finetune_trainer.rl.models import TokenScorer, position_ids_for, same_tokenizer

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages rendered with the chat template


@dataclass
class PromptBatch:
    prompts: list[Prompt]
    input_ids: torch.Tensor  # [B, Q], left-padded so every response starts at column Q
    attention_mask: torch.Tensor


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_prompt_tokens: int) -> PromptBatch:
    """Tokenize (keeping the tail of over-long prompts, where the question usually is) and left-pad."""
    rows = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt)
        ids = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
        rows.append(ids[-max_prompt_tokens:])
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return PromptBatch(prompts=list(prompts), input_ids=input_ids, attention_mask=attention_mask)


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, Q]
    query_mask: torch.Tensor  # [B, Q]
    responses: torch.Tensor  # [B, R], padded after the first stop token
    response_mask: torch.Tensor  # [B, R] bool
    logprobs: torch.Tensor  # [B, R] behaviour policy, temperature-scaled
    values: torch.Tensor  # [B, R] value of the state each response token was chosen in
    raw_scores: torch.Tensor  # [B] as the reward model gave them (before penalty/normalisation/clipping)
    kl: torch.Tensor  # [B, R] per-token estimate used in the reward
    advantages: torch.Tensor  # [B, R] whitened
    returns: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.responses], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], dim=1)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def chunks(size: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def response_logits(
    policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_length: int
) -> torch.Tensor:
    """Logits that predicted each response token: positions Q-1 .. end-1."""
    logits = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    ).logits
    return logits[:, query_length - 1 : -1]


@torch.no_grad()
def batched_logprobs(
    policy: nn.Module, rollout_ids: torch.Tensor, mask: torch.Tensor, query_length: int, temperature: float, micro: int
) -> torch.Tensor:
    out = []
    for part in chunks(rollout_ids.shape[0], micro):
        logits = response_logits(policy, rollout_ids[part], mask[part], query_length)
        out.append(core.logprobs_of(logits, rollout_ids[part, query_length:], temperature))
    return torch.cat(out)


@torch.no_grad()
def batched_token_scores(scorer: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, micro: int) -> torch.Tensor:
    return torch.cat([scorer(input_ids[part], mask[part]) for part in chunks(input_ids.shape[0], micro)])


@torch.no_grad()
def sample_completions(
    policy: nn.Module,
    batch: PromptBatch,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    pad_token_id: int,
    stop_token_ids: core.StopTokens,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(responses padded after their first stop token, response mask, finished) of one sampled completion per prompt."""
    output = policy.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=stop_token_ids,
    )
    responses, mask = core.truncate_after_stop(output[:, batch.input_ids.shape[1] :], stop_token_ids, pad_token_id)
    return responses, mask, core.contains_stop(responses, stop_token_ids)


class RewardScorer:
    """Scores (prompt, response) pairs with the frozen reward model, at the last real token of each sequence.

    When the reward model has its own tokenizer, responses are decoded and re-tokenized with it, the way the reward
    stage saw its training pairs (prompt + response, then eos when the response finished).
    """

    def __init__(
        self,
        model: TokenScorer,
        tokenizer: PreTrainedTokenizerBase,
        policy_tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        micro: int,
    ):
        self.model, self.tokenizer, self.policy_tokenizer = model, tokenizer, policy_tokenizer
        self.retokenize = not same_tokenizer(tokenizer, policy_tokenizer)
        self.max_length, self.micro = max_length, micro

    @torch.no_grad()
    def __call__(
        self, batch: PromptBatch, responses: torch.Tensor, response_mask: torch.Tensor, finished: torch.Tensor
    ) -> torch.Tensor:
        if not self.retokenize:
            input_ids = torch.cat([batch.input_ids, responses], dim=1)
            mask = torch.cat([batch.attention_mask, response_mask.long()], dim=1)
            per_token = batched_token_scores(self.model, input_ids, mask, self.micro)
            rows = torch.arange(responses.shape[0], device=responses.device)
            return per_token[rows, batch.input_ids.shape[1] + core.last_token_index(response_mask)]
        texts = self.reward_texts(batch.prompts, responses, response_mask, finished)
        return self.score_texts(texts, add_special_tokens=isinstance(batch.prompts[0], str), device=responses.device)

    @torch.no_grad()
    def score_texts(self, texts: list[str], add_special_tokens: bool, device: torch.device) -> torch.Tensor:
        """Scores of whole (prompt + response) texts, tokenized with the reward model's own tokenizer."""
        encoded = self.tokenizer(
            texts,
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=add_special_tokens,  # a chat template writes its own bos
            return_tensors="pt",
        )
        mask = encoded["attention_mask"].to(device)
        per_token = batched_token_scores(self.model, encoded["input_ids"].to(device), mask, self.micro)
        return per_token[torch.arange(len(texts), device=device), core.last_token_index(mask)]

    def reward_texts(
        self, prompts: list[Prompt], responses: torch.Tensor, response_mask: torch.Tensor, finished: torch.Tensor
    ) -> list[str]:
        decoded = [
            self.policy_tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            for ids, mask in zip(responses, response_mask)
        ]
        return [
            reward_text(self.tokenizer, prompt, response, done)
            for prompt, response, done in zip(prompts, decoded, finished.tolist())
        ]


def reward_text(
    reward_tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str | list[dict[str, Any]], finished: bool
) -> str:
    """The text a reward stage trained on: prompt + response (+ eos once finished), or the chat-rendered conversation.

    A conversational response (TRL's GRPO hands over the assistant message list) contributes its messages' text.
    """
    if not isinstance(response, str):
        response = "".join(message["content"] for message in response)
    if isinstance(prompt, str):
        return prompt + response + ((reward_tokenizer.eos_token or "") if finished else "")
    return reward_tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
