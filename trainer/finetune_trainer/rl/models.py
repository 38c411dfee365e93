"""The models PPO juggles: per-token heads on sequence classifiers, the reference policy, and tokenizer compatibility."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (adapters stay injected in its layers)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def classifier_head(model: nn.Module) -> nn.Module:
    base = unwrap_peft(model)
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(
        f"{type(base).__name__} has no `score` or `classifier` head; expected an AutoModelForSequenceClassification"
    )


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left-padded prompts start at position 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class TokenScorer(nn.Module):
    """A sequence classifier (num_labels=1) read out at every position: `[B, T]` scalars.

    The reward model's score of a sequence is its value at the last real token; the value model is the same network
    read at every response token. Running the backbone and head directly (instead of the classifier's own pooling)
    keeps the choice of token explicit instead of inferring it from the pad token id, which breaks when pad == eos.
    """

    def __init__(self, classifier: PreTrainedModel):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = unwrap_peft(self.classifier)
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return classifier_head(self.classifier)(hidden).squeeze(-1).float()


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio must be 1 on the first pass over a rollout; dropout (LoRA's included) would make it noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def reference_of(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The frozen reference policy: a separate copy, or the policy itself with its LoRA adapter switched off."""
    if reference is not None:
        yield reference
        return
    disable_adapter = getattr(policy, "disable_adapter", None)
    if disable_adapter is None:
        raise TypeError(
            "a policy without a separate reference model must be a PEFT model (its adapter-free base is the reference)"
        )
    with disable_adapter():
        yield policy


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when token ids mean the same to both, so rollouts can be scored without re-tokenizing."""
    if a is b:
        return True
    return (
        type(a) is type(b)
        and a.get_vocab() == b.get_vocab()
        and a.all_special_tokens == b.all_special_tokens
        and a.bos_token_id == b.bos_token_id
        and a.eos_token_id == b.eos_token_id
    )
