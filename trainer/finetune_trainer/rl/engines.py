"""A trainable model with its optimizer and LR schedule: plain PyTorch in one process, or a DeepSpeed engine.

PPO has no HF Trainer to drive DeepSpeed, so the loop talks to this small interface instead: call the model, `backward`
and `step` after every micro-batch (the optimizer steps once per `accumulation` micro-batches), `gathered()` around
generation, `save`/`load` for checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from finetune_api.spec import TrainingSpec
from finetune_trainer import strategy

MAX_GRAD_NORM = 1.0  # transformers' TrainingArguments default, which PPOv2 inherits


def _optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    """`training.optimizer`, built as transformers' Trainer builds it for `optim`."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr, weight_decay = training.learning_rate, training.weight_decay or 0.0
    name = training.optimizer or "adamw_torch"
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name in strategy.BITSANDBYTES_OPTIMIZERS:
        strategy.check_optimizer(name, gpu=any(p.is_cuda for p in params))
        import bitsandbytes

        optimizer_class = getattr(bitsandbytes.optim, strategy.BITSANDBYTES_OPTIMIZERS[name])
        return optimizer_class(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=name == "adamw_torch_fused")


def _schedule(optimizer: torch.optim.Optimizer, training: TrainingSpec, total_updates: int):
    warmup = int(round((training.warmup_ratio or 0.0) * total_updates))
    return get_scheduler(
        training.lr_scheduler or "cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total_updates
    )


class TorchEngine:
    """Single process, no DeepSpeed: AdamW, gradient accumulation and clipping by hand."""

    def __init__(self, model: nn.Module, training: TrainingSpec, total_updates: int, accumulation: int):
        self.module = model
        self.optimizer = _optimizer(model, training)
        self.scheduler = _schedule(self.optimizer, training, total_updates)
        self.accumulation, self._micro_steps = accumulation, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self._micro_steps += 1
        if self._micro_steps % self.accumulation:
            return
        torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        yield self.module

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        trainable = {name: p.detach().cpu() for name, p in self.module.named_parameters() if p.requires_grad}
        torch.save(
            {
                "model": trainable,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "micro_steps": self._micro_steps,
            },
            directory / "engine.pt",
        )

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=False)
        missing = set(state["model"]) - {name for name, _ in self.module.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint {directory} holds parameters this model lacks: {sorted(missing)[:5]}")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._micro_steps = state["micro_steps"]


class DeepSpeedEngine:
    """A model under `deepspeed.initialize` (ZeRO 0-3, data parallel across the process group)."""

    def __init__(
        self, model: nn.Module, training: TrainingSpec, total_updates: int, accumulation: int, ds_config: dict[str, Any]
    ):
        import deepspeed

        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=_optimizer(model, training),
            lr_scheduler=lambda optimizer: _schedule(optimizer, training, total_updates),
            config=ds_config,
        )
        self.module = self.engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def step(self) -> None:
        self.engine.step()  # steps the optimizer only at accumulation boundaries

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """Under ZeRO-3, materialise the full weights once for a whole generation phase (not per token)."""
        if self.zero_stage != 3:
            yield self.module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield self.module

    def save(self, directory: Path) -> None:
        # Collective: every rank writes its own shard.
        self.engine.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine", load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")


Engine = TorchEngine | DeepSpeedEngine


def deepspeed_batch_config(
    base: dict[str, Any], micro_batch: int, accumulation: int, world_size: int, precision: dict[str, bool]
) -> dict[str, Any]:
    """Resolve the fields a DeepSpeed config leaves "auto" for an HF Trainer, since no HF Trainer runs here."""
    config = {
        key: value
        for key, value in base.items()
        if value != "auto" and key not in ("bf16", "fp16", "optimizer", "scheduler")
    }
    config.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch * accumulation * world_size,
        gradient_clipping=MAX_GRAD_NORM,
        bf16={"enabled": precision["bf16"]},
        fp16={"enabled": precision["fp16"]},
        # Our optimizer is torch AdamW, also with optimizer offload (DeepSpeed's CPU Adam would need an op build).
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    )
    return config
