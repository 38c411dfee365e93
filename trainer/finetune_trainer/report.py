"""`finetune report OUT_DIR`: one self-contained `report.html` for a pipeline run.

It reads what a run leaves in its storage directory: `status.json`, each stage's `metrics.jsonl` (the curves) and,
where a stage evaluated generations, its `predictions.jsonl`. The page holds the per-stage loss and held-out
curves, reward and KL for RL stages, the metrics table, the gates and their verdicts (the stages' phases, reasons
and messages), and the worst predictions per task. Plots are plotly figures; plotly.js is embedded once, so the file
opens anywhere without a network.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from finetune_api.status import FineTuneJobStatus
from finetune_api.table import metrics_cell

REPORT_FILE = "report.html"
# Curves drawn per stage, when its metrics.jsonl has them: training loss, held-out loss, and RL's reward and KL.
CURVES = {
    "loss": "training loss",
    "eval_loss": "held-out loss",
    "score": "reward (score)",
    "kl": "KL to the reference",
    "rewards/margins": "reward margin",
}
WORST_EXAMPLES = 5


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill mid-write
    return rows


def stage_figure(stage: str, history: list[dict[str, Any]]):
    """A plotly figure of the stage's curves, or None when it logged none of them."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for key, label in CURVES.items():
        points = [(row["step"], row[key]) for row in history if key in row and not row.get("final")]
        if points:
            steps, values = zip(*points)
            figure.add_trace(go.Scatter(x=list(steps), y=list(values), mode="lines+markers", name=label))
    if not figure.data:
        return None
    figure.update_layout(title=f"{stage}", xaxis_title="step", height=360, margin={"t": 40, "b": 40})
    return figure


def worst_predictions(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The lowest-scoring predictions per task (score: the row's first numeric `scores` value)."""

    def score(row: dict[str, Any]) -> float:
        values = [v for v in (row.get("scores") or {}).values() if isinstance(v, int | float)]
        return min(values) if values else 0.0

    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(str(row.get("task") or "all"), []).append(row)
    return {task: sorted(task_rows, key=score)[:WORST_EXAMPLES] for task, task_rows in sorted(by_task.items())}


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(storage_dir: Path, status: FineTuneJobStatus, title: str) -> str:
    import plotly.io as pio

    sections, embedded = [], False
    for stage in status.stages:
        figure = stage_figure(stage.name, read_jsonl(storage_dir / stage.name / "metrics.jsonl"))
        if figure is None:
            sections.append(f"<h3>{html.escape(stage.name)}</h3><p>no curves logged</p>")
            continue
        # plotly.js goes into the first figure only; the others use it.
        sections.append(
            pio.to_html(figure, full_html=False, include_plotlyjs=not embedded, div_id=f"curve-{stage.name}")
        )
        embedded = True

    metrics = _table(
        ["stage", "type", "phase", "attempts", "metrics", "model"],
        [
            [s.name, s.type, s.phase or "Pending", str(s.attempts), metrics_cell(s.metrics), s.checkpoint or "-"]
            for s in status.stages
        ],
    )
    every_metric = _table(
        ["stage", "metric", "value"],
        [[s.name, key, f"{value:.6g}"] for s in status.stages for key, value in sorted(s.metrics.items())],
    )
    verdicts = _table(
        ["condition", "status", "reason", "message"],
        [[c.type, c.status, c.reason, c.message] for c in status.conditions],
    ) + _table(["stage", "phase", "message"], [[s.name, s.phase or "Pending", s.message] for s in status.stages])

    examples = []
    for stage in status.stages:
        for task, rows in worst_predictions(read_jsonl(storage_dir / stage.name / "predictions.jsonl")).items():
            examples.append(f"<h3>{html.escape(stage.name)}: {html.escape(task)}</h3>")
            examples.append(
                _table(
                    ["prompt", "reference", "output", "scores"],
                    [
                        [
                            str(r.get("prompt", "")),
                            str(r.get("reference", "")),
                            str(r.get("output", "")),
                            json.dumps(r.get("scores") or {}),
                        ]
                        for r in rows
                    ],
                )
            )

    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}"
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p>phase <b>{html.escape(status.phase or 'Pending')}</b>, stages {html.escape(status.progress or '-')}</p>",
            "<h2>Stages</h2>",
            metrics,
            "<h2>Curves</h2>",
            *sections,
            "<h2>Gates and verdicts</h2>",
            verdicts,
            "<h2>All metrics</h2>",
            every_metric,
            *(["<h2>Worst predictions</h2>", *examples] if examples else []),
            "</body></html>",
        ]
    )


def write_report(storage_dir: Path, status_path: Path | None = None) -> Path:
    """Render `<storage_dir>/report.html` from the run's files; returns its path."""
    status_path = status_path or storage_dir / "status.json"
    status = FineTuneJobStatus.model_validate_json(status_path.read_text())
    target = storage_dir / REPORT_FILE
    target.write_text(render(storage_dir, status, f"finetune run: {storage_dir.name}"))
    return target
