"""Dataset mixtures (`stage.datasets`): shares by weight or sample count, seeded interleaving or concatenation,
per-source validation with errors naming `spec.stages[i].datasets[j]`, and the held-out rows of every source."""

import json

import pytest
from pydantic import ValidationError

from finetune_trainer.data import load_stage_data
from finetune_trainer.errors import DataValidationError

pytestmark = pytest.mark.unit

SFT_COLUMNS = [("messages",), ("prompt", "completion"), ("instruction", "response"), ("text",)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sources(tmp_path):
    sums = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"} for a in range(5) for b in range(4)]
    larger = [
        {"prompt": f"Which is larger, {a} or {b}?", "completion": f" {max(a, b)}"} for a in range(3) for b in (7, 8)
    ]
    text = tmp_path / "replay.txt"
    text.write_text("".join(f"{a} plus 1 is {a + 1}.\n" for a in range(10)))
    return write_jsonl(tmp_path / "sums.jsonl", sums), write_jsonl(tmp_path / "larger.jsonl", larger), str(text)


def mixture(render, datasets, mixing="interleave"):
    return render({"type": "sft", "datasets": datasets, "mixing": mixing})


def test_weights_split_the_weighted_total_and_samples_are_exact(render, sources):
    sums, larger, replay = sources
    config = mixture(
        render,
        [
            {"task": "sums", "uri": sums, "weight": 3, "validationSplit": 0.25},  # 15 training rows
            {"task": "larger", "uri": larger, "weight": 1, "validationSplit": 0.5},  # 3 training rows
            {"task": "replay", "uri": replay, "samples": 25, "validationSplit": 0.2},  # 8 rows, repeated to 25
        ],
    )
    data = load_stage_data(config, SFT_COLUMNS, mixed_columns=True)
    # The weighted sources keep their total (15 + 3 = 18), split 3:1 -> 13.5 and 4.5, rounded half to even.
    counts = {task: data.train_tasks.count(task) for task in ("sums", "larger", "replay")}
    assert counts == {"sums": 14, "larger": 4, "replay": 25}
    assert len(data.train) == len(data.train_tasks) == 43
    assert data.eval_tasks == ("sums",) * 5 + ("larger",) * 3 + ("replay",) * 2
    # Each training row keeps its own columns: the text rows have no prompt and the others no text.
    for row, task in zip(data.train, data.train_tasks):
        assert (row["text"] is not None) == (task == "replay"), (row, task)


def test_interleaving_is_deterministic_by_seed_and_concat_keeps_source_order(render, sources):
    sums, larger, _ = sources
    datasets = [{"task": "sums", "uri": sums}, {"task": "larger", "uri": larger}]
    first = load_stage_data(mixture(render, datasets), SFT_COLUMNS)
    again = load_stage_data(mixture(render, datasets), SFT_COLUMNS)
    assert first.train.to_list() == again.train.to_list() and first.train_tasks == again.train_tasks
    assert first.train_tasks != tuple(sorted(first.train_tasks, key=["sums", "larger"].index))  # actually mixed
    concatenated = load_stage_data(mixture(render, datasets, mixing="concat"), SFT_COLUMNS)
    assert concatenated.train_tasks == tuple(sorted(concatenated.train_tasks, key=["sums", "larger"].index))


def test_a_bad_source_is_named_by_its_field_path(render, sources, tmp_path):
    sums, _, _ = sources
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"question": "What is 1 plus 1?"}])
    config = mixture(render, [{"task": "sums", "uri": sums}, {"task": "broken", "uri": broken}])
    with pytest.raises(DataValidationError, match=r"^spec\.stages\[0\]\.datasets\[1\]\.uri: .*broken\.jsonl:line 1"):
        load_stage_data(config, SFT_COLUMNS)


def test_sources_of_a_uniform_stage_must_share_columns(render, sources):
    sums, _, replay = sources
    config = mixture(render, [{"task": "sums", "uri": sums}, {"task": "replay", "uri": replay}])
    with pytest.raises(DataValidationError, match=r"datasets\[1\]\.uri: .*columns \{text\}, but the first dataset"):
        load_stage_data(config, SFT_COLUMNS)


def test_the_spec_takes_one_of_dataset_and_datasets_and_one_share_per_source(render, sources):
    sums, larger, _ = sources
    with pytest.raises(ValidationError, match="set exactly one of dataset"):
        render({"type": "sft", "dataset": {"uri": sums}, "datasets": [{"uri": larger}]})
    with pytest.raises(ValidationError, match="either weight or samples"):
        mixture(render, [{"uri": sums, "weight": 1, "samples": 3}])
    with pytest.raises(ValidationError, match="duplicate task name 'a'"):
        mixture(render, [{"task": "a", "uri": sums}, {"task": "a", "uri": larger}])
    assert [t for t, _, _ in mixture(render, [{"uri": sums}, {"uri": larger}]).stage.data_sources()] == [
        "dataset0",
        "dataset1",
    ]
