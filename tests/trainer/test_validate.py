"""`finetune validate`: every stage's data, the model and the storage location are checked up front; nothing trains."""

import json
from pathlib import Path

import pytest
from stage_helpers import DATA, run_cli, write_manifest

from finetune_api.manifest import parse_manifest
from finetune_trainer.validate import accepted_columns, preflight

pytestmark = pytest.mark.unit


def pipeline(model: Path | str, storage: Path | str, stages: list[dict]) -> dict:
    return {
        "model": {"source": str(model)},
        "storage": {"uri": str(storage)},
        "peft": {"method": "full"},
        "stages": stages,
    }


def test_accepted_columns_are_the_recipes_own():
    from finetune_trainer.recipes import cpt

    assert accepted_columns("cpt") == cpt.ACCEPTED_COLUMNS
    assert accepted_columns("sft") == [("messages",), ("prompt", "completion"), ("instruction", "response"), ("text",)]


def test_every_problem_of_every_stage_is_listed_and_nothing_trains(tmp_path: Path, tiny_model_dir: Path):
    broken = tmp_path / "broken.jsonl"
    good_line = json.dumps({"prompt": "What is 1 plus 1?", "completion": " 2"})
    broken.write_text("\n".join([good_line] * 36 + ['{"prompt": "x" "completion": "y"}', good_line]) + "\n")
    wrong_columns = tmp_path / "wrong.jsonl"
    wrong_columns.write_text('{"question": "a", "answer": "b"}\n' * 3)
    storage = tmp_path / "out"
    stages = [
        {"name": "domain", "type": "cpt", "dataset": {"uri": str(DATA / "domain.txt"), "format": "text"}},
        {"name": "instruct", "type": "sft", "dataset": {"uri": str(broken)}},
        {"name": "rm", "type": "reward", "dataset": {"uri": str(wrong_columns)}},
        {
            "name": "dpo",
            "type": "dpo",
            "dataset": {"uri": str(DATA / "prefs.jsonl"), "validationUri": str(tmp_path / "absent.jsonl")},
        },
    ]
    manifest = write_manifest(tmp_path / "job.yaml", pipeline(tiny_model_dir, storage, stages))
    result = run_cli("validate", str(manifest), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    problems = result.stderr.strip().splitlines()
    assert problems == [
        f"{manifest}: e2e: spec.stages[1].dataset.uri: stage 'instruct': {broken}:line 37: malformed JSON"
        + problems[0].split("malformed JSON", 1)[1],
        f"{manifest}: e2e: spec.stages[2].dataset.uri: stage 'rm': {wrong_columns}:line 1: found columns "
        "{question, answer}; expected columns {prompt, chosen, rejected} or {chosen, rejected}",
        f"{manifest}: e2e: spec.stages[3].dataset.validationUri: stage 'dpo': {tmp_path / 'absent.jsonl'}: "
        "file not found; expected columns {prompt, chosen, rejected}",
    ], problems
    assert not storage.exists()


def test_mixture_sources_and_suites_are_checked_by_their_field_paths(tmp_path: Path, tiny_model_dir: Path):
    wrong_columns = tmp_path / "wrong.jsonl"
    wrong_columns.write_text('{"question": "a"}\n')
    bad_choices = tmp_path / "choices.jsonl"
    bad_choices.write_text('{"question": "1 plus 1 is", "choices": ["2", "3"], "answer": 5}\n')
    stages = [
        {
            "name": "mix",
            "type": "sft",
            "datasets": [{"uri": str(DATA / "instruct.jsonl")}, {"task": "bad", "uri": str(wrong_columns)}],
        }
    ]
    spec = pipeline(tiny_model_dir, tmp_path / "out", stages)
    spec["evaluation"] = {"suites": [{"name": "mc", "type": "multipleChoice", "uri": str(bad_choices)}]}
    manifest = write_manifest(tmp_path / "job.yaml", spec)
    result = run_cli("validate", str(manifest), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    problems = result.stderr.strip().splitlines()
    assert problems[0].startswith(
        f"{manifest}: e2e: spec.stages[0].datasets[1].uri: stage 'mix': {wrong_columns}:line 1"
    )
    assert problems[1] == (
        f"{manifest}: e2e: spec.evaluation.suites[0].uri: evaluation suite 'mc': {bad_choices}: row 1: `answer` is 5; "
        "expected the index (0-1) of the right choice"
    ), problems


def test_a_valid_pipeline_passes_and_remote_inputs_are_noted(tmp_path: Path, tiny_model_dir: Path):
    stages = [
        {"name": "instruct", "type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}},
        {"name": "hub", "type": "sft", "dataset": {"uri": "hf://org/data"}},
    ]
    manifest = write_manifest(tmp_path / "job.yaml", pipeline(tiny_model_dir, tmp_path / "out", stages))
    result = run_cli("validate", str(manifest), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{manifest}: e2e: valid (2 stages)" in result.stdout
    assert "spec.stages[1].dataset.uri hf://org/data: remote, not checked here" in result.stdout


def test_model_and_storage_problems(tmp_path: Path):
    occupied = tmp_path / "file"
    occupied.write_text("not a directory")
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    for source, expected in (
        (tmp_path / "absent-model", "spec.model.source: model"),
        (not_a_model, "no config.json"),
    ):
        job = parse_manifest(
            json.dumps(
                {
                    "apiVersion": "finetune.dev/v1alpha1",
                    "kind": "FineTuneJob",
                    "metadata": {"name": "m"},
                    "spec": pipeline(
                        source,
                        occupied / "out",
                        [{"name": "a", "type": "sft", "dataset": {"uri": str(DATA / "instruct.jsonl")}}],
                    ),
                }
            )
        )
        problems, _ = preflight(job, cache=tmp_path / "cache")
        assert any(expected in p for p in problems), problems
        assert any(f"spec.storage.uri: {occupied / 'out'}: {occupied} is a file" in p for p in problems), problems


def test_manifest_errors_of_several_files_are_all_listed(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: b}\nspec: {}\n")
    two = tmp_path / "two.yaml"
    two.write_text(bad.read_text() + "---\n" + bad.read_text())
    result = run_cli("validate", str(bad), str(two), timeout=120)
    assert result.returncode == 2
    assert f"{bad}:4: spec.model: required field is missing" in result.stderr
    assert f"{two}: holds" not in result.stderr  # both documents are invalid: their errors come first
    assert f"{two}:9: spec.model: required field is missing" in result.stderr
