"""Dataset loading and validation: every supported format, renames, splits, and errors that name stage/file/line/columns."""

import csv
import json

import pytest

from finetune_trainer.data import load_stage_data
from finetune_trainer.errors import DataValidationError

pytestmark = pytest.mark.unit

SFT_COLUMNS = [("messages",), ("prompt", "completion"), ("instruction", "response")]
ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"} for a in range(5) for b in range(4)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_config(render, uri, **dataset):
    return render({"type": "sft", "name": "chat", "dataset": {"uri": str(uri), **dataset}})


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "arrow"])
def test_every_format_loads_with_a_seeded_split(render, tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, indent=1))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    config = sft_config(render, path, validationSplit=0.25)
    first, second = load_stage_data(config, SFT_COLUMNS), load_stage_data(config, SFT_COLUMNS)
    assert first.columns == ("prompt", "completion")
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert list(first.eval["prompt"]) == list(second.eval["prompt"])  # seeded: the same held-out rows every time
    assert {r["prompt"] for r in first.train}.isdisjoint(r["prompt"] for r in first.eval)


def test_text_files_become_documents(render, tmp_path):
    text = tmp_path / "domain.txt"
    text.write_text("1 plus 1 is 2.\n\n2 plus 2 is 4.\n3 plus 3 is 6.\n4 plus 4 is 8.\n")
    config = render({"type": "cpt", "dataset": {"uri": str(text), "validationSplit": 0.25}})
    data = load_stage_data(config, [("text",)])
    assert sorted(list(data.train["text"]) + list(data.eval["text"])) == [
        "1 plus 1 is 2.",
        "2 plus 2 is 4.",
        "3 plus 3 is 6.",
        "4 plus 4 is 8.",
    ]
    folder = tmp_path / "docs"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.txt").write_text(f"document {index}\nsecond line\n")
    data = load_stage_data(
        render({"type": "cpt", "dataset": {"uri": str(folder), "validationSplit": 0.34}}), [("text",)]
    )
    assert len(data.train) + len(data.eval) == 3 and all("second line" in t for t in data.train["text"])


def test_renames_max_samples_and_separate_validation_file(render, tmp_path):
    renamed = [{"question": r["prompt"], "answer": r["completion"]} for r in ROWS]
    train = write_jsonl(tmp_path / "train.jsonl", renamed)
    held_out = write_jsonl(tmp_path / "eval.jsonl", renamed[:3])
    config = sft_config(
        render, train, columns={"question": "prompt", "answer": "completion"}, maxSamples=7, validationUri=str(held_out)
    )
    data = load_stage_data(config, SFT_COLUMNS)
    assert data.columns == ("prompt", "completion")
    assert len(data.train) == 7 and len(data.eval) == 3
    assert data.train[0]["prompt"] == ROWS[0]["prompt"]


def test_missing_file_names_stage_file_and_columns(render, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataValidationError) as error:
        load_stage_data(sft_config(render, missing), SFT_COLUMNS)
    message = str(error.value)
    assert "stage 'chat'" in message and str(missing) in message and "file not found" in message
    assert "{prompt, completion}" in message and error.value.reason == "InvalidDataset" and error.value.permanent


def test_missing_column_names_the_line(render, tmp_path):
    rows = ROWS[:4] + [{"prompt": "What is 1 plus 1?", "answer": " 2"}] + ROWS[4:]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataValidationError) as error:
        load_stage_data(sft_config(render, path), SFT_COLUMNS)
    message = str(error.value)
    assert f"{path}:line 5" in message and "'completion'" in message and "stage 'chat'" in message
    assert "expected columns {messages} or {prompt, completion} or {instruction, response}" in message


def test_first_row_without_any_accepted_columns(render, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataValidationError, match=r"line 1: found columns \{question, answer\}; expected columns"):
        load_stage_data(sft_config(render, path), SFT_COLUMNS)


def test_malformed_json_line(render, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "What is 1 plus 1?", "completion": \n'
    )
    with pytest.raises(DataValidationError) as error:
        load_stage_data(sft_config(render, path), SFT_COLUMNS)
    assert f"{path}:line 3: malformed JSON" in str(error.value)


def test_malformed_messages(render, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user"}]}]
    )
    with pytest.raises(DataValidationError, match=r"line 2: `messages` must be a list of \{role, content\}"):
        load_stage_data(sft_config(render, path), SFT_COLUMNS)


def test_unsupported_extension(render, tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<rows/>")
    with pytest.raises(DataValidationError, match="unsupported format 'unknown'"):
        load_stage_data(sft_config(render, path), SFT_COLUMNS)


def test_a_wrong_typed_value_deep_in_the_file_names_file_line_column_and_type(render, tmp_path):
    rows = [ROWS[i % len(ROWS)] for i in range(200)]
    rows[150] = {"prompt": "What is 2 plus 2?", "completion": 4}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataValidationError) as error:
        load_stage_data(sft_config(render, path), SFT_COLUMNS)
    assert str(error.value) == (
        f"stage 'chat': {path}:line 151: column 'completion' is int 4; expected a string or a list of "
        "{role, content} messages"
    )
    assert error.value.reason == "InvalidDataset" and error.value.permanent


def test_text_in_one_row_and_chat_messages_in_another_is_refused(render, tmp_path):
    chat = {"prompt": [{"role": "user", "content": "What is 1 plus 1?"}], "completion": " 2"}
    path = write_jsonl(tmp_path / "d.jsonl", [*ROWS[:3], chat])
    with pytest.raises(
        DataValidationError, match=r"line 4: column 'prompt' is list .*; expected a string, as at line 1"
    ):
        load_stage_data(sft_config(render, path), SFT_COLUMNS)


def test_a_split_that_leaves_no_training_rows_fails_before_training(render, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:5])
    with pytest.raises(DataValidationError, match="validationSplit 0.99 of 5 rows leaves no training") as error:
        load_stage_data(sft_config(render, path, validationSplit=0.99), SFT_COLUMNS)
    assert error.value.permanent
