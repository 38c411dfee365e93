"""The shipped example pipelines run end to end with `finetune run`, exactly as `make run` runs them, and learn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_dev.testing import source_env

pytestmark = [pytest.mark.train, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def run_example(name: str, workdir: Path, tiny_model_dir: Path) -> dict:
    """`finetune run examples/<name>.yaml` from a directory laid out like the repository root (relative paths included)."""
    (workdir / "models").mkdir(parents=True)
    (workdir / "models" / "tiny").symlink_to(tiny_model_dir)
    (workdir / "examples").symlink_to(REPO / "examples")
    status_file = workdir / "status.json"
    result = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "run", f"examples/{name}.yaml", "--status-file", str(status_file)],
        cwd=workdir,
        env=source_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    status = json.loads(status_file.read_text())
    assert status["phase"] == "Succeeded"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"
    # Quiet: the stages' own output went to their stage.log; the terminal got the pipeline's lines and the table.
    printed = (result.stdout + result.stderr).splitlines()
    assert len(printed) <= 40, "\n".join(printed)
    for stage in status["stages"]:
        assert stage["phase"] == "Succeeded" and stage["attempts"] == 1, stage
        assert (workdir / stage["checkpoint"] / "config.json").is_file(), stage
        stage_dir = (workdir / stage["checkpoint"]).parent
        assert (stage_dir / "stage.log").stat().st_size > 0, stage
        history = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("loss" in row for row in history) and history[-1].get("final"), stage["name"]
    assert (workdir / stage["checkpoint"]).parent.parent.joinpath("report.html").is_file()
    return {stage["name"]: stage["metrics"] for stage in status["stages"]}


def test_quickstart_learns_on_ray_with_zero2(tmp_path, tiny_model_dir):
    metrics = run_example("quickstart", tmp_path, tiny_model_dir)
    for stage in ("cpt", "sft"):
        assert metrics[stage]["eval_loss_after"] < metrics[stage]["eval_loss_before"], metrics[stage]
    # The forgetting guard: CPT teaches the domain, SFT (with replay) keeps it within the gate; the reward model is
    # not scored, DPO is.
    assert metrics["cpt"]["domain_loss_after"] < metrics["cpt"]["domain_loss_before"] - 2.0, metrics["cpt"]
    for stage in ("sft", "dpo"):
        assert metrics[stage]["domain_regression"] <= 0.5, metrics[stage]
        assert 0.0 <= metrics[stage]["domain_choices_accuracy_after"] <= 1.0, metrics[stage]
    assert not any(key.startswith("domain") for key in metrics["reward"]), metrics["reward"]
    assert {"eval_loss_addition", "eval_loss_replay", "exact_match", "bleu"} <= set(metrics["sft"]), metrics["sft"]
    assert metrics["sft"]["bleu"] > 0 or metrics["sft"]["exact_match"] == 0, metrics["sft"]
    assert metrics["reward"]["eval_reward_accuracy"] >= 0.8, metrics["reward"]
    # The alignment stage really aligns: held-out pairs ranked right, by a clear implicit-reward margin.
    assert metrics["dpo"]["eval_reward_accuracy"] >= 0.8, metrics["dpo"]
    assert metrics["dpo"]["eval_reward_margin"] >= 0.2, metrics["dpo"]


def test_rlhf_example_runs_ppo_on_the_pipelines_reward_model(tmp_path, tiny_model_dir):
    metrics = run_example("rlhf", tmp_path, tiny_model_dir)
    assert metrics["reward"]["eval_reward_accuracy"] > 0.5, metrics["reward"]
    ppo = metrics["ppo"]
    assert ppo["reward_mean_last"] > ppo["reward_mean_first"], ppo
    assert ppo["kl_mean"] <= 15, ppo  # the example's maxKl gate


def test_multitask_example_reports_per_task_and_per_suite_metrics(tmp_path, tiny_model_dir):
    metrics = run_example("multitask", tmp_path, tiny_model_dir)["sft"]
    for task in ("addition", "compare", "replay"):
        assert metrics[f"eval_loss_{task}"] < metrics["eval_loss_before"], (task, metrics)
    for task in ("addition", "compare"):  # replay rows have no prompt to generate for
        assert 0.0 <= metrics[f"exact_match_{task}"] <= 1.0 and 0.0 <= metrics[f"rougeL_{task}"] <= 1.0, metrics
    assert metrics["domain_loss_after"] < metrics["domain_loss_before"], metrics
    # domain.txt repeats no line and shares none with the held-out documents; the SFT files have no PII.
    assert {k: v for k, v in metrics.items() if k.startswith("hygiene_")} == {
        "hygiene_pii_scrubbed": 0,
        "hygiene_exact_duplicates": 0,
        "hygiene_near_duplicates": 0,
        "hygiene_contaminated": 0,
    }, metrics
    for key in ("accuracy", "accuracy_carry", "accuracy_no_carry"):
        assert f"domain_choices_{key}_before" in metrics and f"domain_choices_{key}_after" in metrics, metrics
    predictions = [
        json.loads(line) for line in (tmp_path / "out/multitask/sft/predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 30 and {p["task"] for p in predictions} == {"addition", "compare"}
    assert set(predictions[0]) == {"task", "prompt", "reference", "output", "exact_match", "rougeL", "bleu"}
