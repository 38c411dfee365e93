"""What stands between training and a stage's output: divergence checks and the held-out loss gate.

A diverged model (a NaN/inf loss or weight) fails the stage with TrainingDiverged, during training (a callback on every
logged loss, evaluation and checkpoint) and once more before the final save, so neither a broken checkpoint nor a broken
output model is ever written for the next stage to start from.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from finetune_api.render import StageConfig
from finetune_trainer.errors import DataValidationError, QualityGateError, TrainingDivergedError
from finetune_trainer.metrics import STAGE_METRICS


def non_finite(values: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in values.items() if isinstance(value, int | float) and not math.isfinite(value)}


def _losses(logs: dict, grad_norm: bool) -> dict[str, float]:
    return {
        key: value
        for key, value in logs.items()
        if key == "loss" or key.endswith("_loss") or (grad_norm and key == "grad_norm")
    }


def non_finite_parameters(model) -> list[str]:
    """Names of the parameters of this rank's copy (or shard) that hold a NaN or inf."""
    import torch

    with torch.no_grad():
        return [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any, so all ranks fail together instead of some waiting forever."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def diverged(stage: str, learning_rate: float | None, what: str) -> TrainingDivergedError:
    rate = f" (training.learningRate {learning_rate:g})" if learning_rate is not None else ""
    return TrainingDivergedError(
        f"stage {stage!r} diverged: {what}{rate}. Lower training.learningRate (try 10x lower), raise "
        "training.warmupRatio, or use precision bf16 or fp32 instead of fp16. The stage output was not written; "
        "earlier checkpoints are kept (only finite ones are saved)"
    )


def _diverged(config: StageConfig, what: str) -> TrainingDivergedError:
    return diverged(config.stage.name, config.training.learning_rate, what)


def check_metrics(config: StageConfig, metrics: dict[str, float]) -> None:
    """Fail the stage when a final metric is NaN/inf; a recipe that leaves out one of its schema's metrics is a bug."""
    missing = [key for key in STAGE_METRICS[config.stage.type] if key not in metrics]
    if missing:
        raise RuntimeError(f"the {config.stage.type} recipe reported no {', '.join(missing)} (see docs/trainer.md)")
    bad = non_finite(metrics)
    if bad:
        raise _diverged(config, "held-out metrics " + ", ".join(f"{key}={value}" for key, value in sorted(bad.items())))


def check_weights(config: StageConfig, model, every_rank: bool = True) -> None:
    """Fail the stage when the model to be saved holds a NaN/inf weight.

    With `every_rank`, call on every rank: a NaN/inf in any rank's copy (or shard) fails them all. Without it only this
    rank's model is checked, and no other rank takes part (rank 0's whole copy of a ZeRO-3 model)."""
    bad = non_finite_parameters(model)
    if _any_rank(bool(bad)) if every_rank else bad:
        where = f"{len(bad)} weight tensor(s) hold NaN/inf, e.g. {bad[0]}" if bad else "weights hold NaN/inf"
        raise _diverged(config, where)


def check_improvement(config: StageConfig, metrics: dict[str, float]) -> None:
    """The optional `training.minImprovement` gate: the held-out loss must drop by at least that much."""
    required = config.training.min_improvement
    if required is None:
        return
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    if before is None or after is None:
        raise QualityGateError(
            f"stage {config.stage.name!r}: training.minImprovement is set but the stage reported no held-out loss "
            "before and after training"
        )
    if before - after < required:
        raise QualityGateError(
            f"stage {config.stage.name!r}: held-out loss went from {before:.4f} to {after:.4f}, a drop of "
            f"{before - after:.4f}, below training.minImprovement {required:g}; the model was not saved as the stage "
            "output (checkpoints are kept)"
        )


def check_rows_left(config: StageConfig, trainer, train_rows: int, held_out_rows: int) -> None:
    """Fail before training when tokenization left no rows: TRL's trainers drop rows that do not fit
    `training.maxLength` (reward: a pair longer than it; DPO, KTO: a prompt that fills it; SFT: no completion token
    left)."""
    for name, dataset, before in (
        ("training", trainer.train_dataset, train_rows),
        ("held-out", trainer.eval_dataset, held_out_rows),
    ):
        if dataset is not None and len(dataset) == 0:
            raise DataValidationError(
                f"stage {config.stage.name!r}: {config.stage.dataset.uri}: none of the {before} {name} rows is left "
                f"once tokenized to training.maxLength {config.training.max_length} tokens (each is too long, or its "
                "prompt leaves no room for the completion); raise training.maxLength or shorten the rows"
            )


def divergence_callback(config: StageConfig, loss_scaling: bool):
    """An HF TrainerCallback failing the stage at the first non-finite logged loss, evaluation or checkpoint.

    Put it before the callback that uploads checkpoints: a checkpoint with NaN/inf weights is deleted, not synced.
    Trainer arguments must set `logging_nan_inf_filter=False`, or the logged loss hides NaN steps. With fp16
    `loss_scaling` an inf gradient norm is an overflow step the scaler skips, not a divergence; otherwise it is one.
    """
    from transformers import TrainerCallback

    class DivergenceCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = non_finite(_losses(logs or {}, grad_norm=not loss_scaling))
            if bad:
                found = ", ".join(f"{key} {value}" for key, value in sorted(bad.items()))
                raise _diverged(config, f"{found} at step {state.global_step} of {state.max_steps}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            bad = non_finite(_losses(metrics or {}, grad_norm=False))
            if bad:
                found = ", ".join(f"{key} {value}" for key, value in sorted(bad.items()))
                raise _diverged(config, f"{found} at step {state.global_step} of {state.max_steps}")

        def on_save(self, args, state, control, model=None, **kwargs):
            bad = non_finite_parameters(model) if model is not None else []
            if _any_rank(bool(bad)):
                shutil.rmtree(Path(args.output_dir) / f"checkpoint-{state.global_step}", ignore_errors=True)
                raise _diverged(config, f"weights hold NaN/inf at step {state.global_step} of {state.max_steps}")

    return DivergenceCallback()
