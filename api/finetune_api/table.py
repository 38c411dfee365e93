"""The stage table that `finetune run`, `finetune status` and `kubectl finetune status` print from a status."""

from __future__ import annotations

from finetune_api.status import FineTuneJobStatus
from finetune_api.timeutil import format_duration, seconds_between

# Shown first when present; other metrics fill the remaining columns alphabetically.
LEADING_METRICS = (
    "eval_loss_before",
    "eval_loss_after",
    "perplexity_after",
    "rougeL",
    "bleu",
    "eval_reward_accuracy",
    "eval_reward_margin",
    "reward_mean_first",
    "reward_mean_last",
    "kl_mean",
)
METRIC_COLUMNS = 5


def metrics_cell(metrics: dict[str, float]) -> str:
    shown = [k for k in LEADING_METRICS if k in metrics]
    shown += [k for k in sorted(metrics) if k not in shown and not k.startswith(("perplexity_", "train_"))]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in shown[:METRIC_COLUMNS]) or "-"


def summary_line(status: FineTuneJobStatus) -> str:
    """`<phase> <progress>: <reason>: <message>` of the condition that says where the job stands."""
    condition = next(
        (
            c
            for c in status.conditions
            if c.type in ("Failed", "Succeeded", "Suspended", "Running") and c.status == "True"
        ),
        None,
    )
    head = f"{status.phase or 'Pending'} {status.progress or ''}".rstrip()
    return head + (f": {condition.reason}: {condition.message}" if condition else "")


def stage_table(status: FineTuneJobStatus) -> list[str]:
    rows = [("STAGE", "TYPE", "PHASE", "DURATION", "METRICS", "CHECKPOINT")]
    for stage in status.stages:
        duration = format_duration(seconds_between(stage.start_time, stage.completion_time))
        checkpoint = stage.checkpoint or stage.last_checkpoint or "-"
        rows.append(
            (stage.name, stage.type, stage.phase or "Pending", duration, metrics_cell(stage.metrics), checkpoint)
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def print_table(status: FineTuneJobStatus) -> None:
    print()
    print("\n".join(stage_table(status)))
