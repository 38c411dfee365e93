"""`finetune report`: report.html from a run's files, checked in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from finetune_api.status import FineTuneJobStatus
from finetune_trainer.report import read_jsonl, render, worst_predictions, write_report

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
    "--dump-dom",
]


def write_run(root: Path) -> Path:
    status = {
        "phase": "Failed",
        "progress": "1/2",
        "conditions": [
            {"type": "Stalled", "status": "True", "reason": "QualityGateFailed", "message": "reward accuracy 0.41"}
        ],
        "stages": [
            {"name": "sft", "type": "sft", "phase": "Succeeded", "attempts": 1, "metrics": {"eval_loss_after": 0.9}},
            {"name": "ppo", "type": "ppo", "phase": "Failed", "attempts": 2, "message": "QualityGateFailed: too low"},
        ],
    }
    (root / "sft").mkdir(parents=True)
    (root / "ppo").mkdir()
    (root / "status.json").write_text(json.dumps(status))
    sft = [{"step": s, "loss": 3.0 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.9}]
    sft.append({"step": 10, "eval_loss_after": 0.9, "final": True})
    (root / "sft" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sft) + '{"step": 11, "lo')
    (root / "ppo" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "score": s / 10, "kl": s / 100}) + "\n" for s in range(1, 6))
    )
    predictions = [
        {
            "prompt": f"What is {i} plus 1?",
            "reference": str(i + 1),
            "output": "7",
            "scores": {"rougeL": i / 10},
            "task": "math" if i % 2 else "trivia",
        }
        for i in range(10)
    ]
    (root / "sft" / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in predictions))
    return root


def test_report_holds_curves_metrics_verdicts_and_the_worst_predictions(tmp_path):
    root = write_run(tmp_path / "run")
    assert len(read_jsonl(root / "sft" / "metrics.jsonl")) == 12  # the line cut short by a kill is skipped
    worst = worst_predictions(read_jsonl(root / "sft" / "predictions.jsonl"))
    assert [r["prompt"] for r in worst["math"]][:2] == ["What is 1 plus 1?", "What is 3 plus 1?"]
    assert len(worst["trivia"]) == 5

    page = render(root, FineTuneJobStatus.model_validate_json((root / "status.json").read_text()), "run")
    assert page.count("<script") >= 2 and 'id="curve-sft"' in page and 'id="curve-ppo"' in page
    for text in (
        "QualityGateFailed",
        "reward accuracy 0.41",
        "eval_loss_after",
        "What is 1 plus 1?",
        "KL to the reference",
    ):
        assert text in page
    assert write_report(root) == root / "report.html"


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test installs it)"
)
def test_the_report_loads_in_a_browser_without_errors_and_its_charts_have_data(tmp_path):
    report = write_report(write_run(tmp_path / "run"))
    browser = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert browser.returncode == 0, browser.stderr[-2000:]
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    # Four traces drawn (sft: loss, held-out loss; ppo: reward, KL), with a marker per logged point: 10 + 1 + 5 + 5.
    assert len(re.findall(r'class="trace scatter', browser.stdout)) == 4
    assert len(re.findall(r'<path class="point"', browser.stdout)) == 21
