"""Load and validate a stage's dataset before any training step.

Formats: JSONL, JSON (a list of objects, or {"data": [...]}), Parquet, CSV, plain text (one document per line; a
directory of .txt files is one document per file) and `datasets` save-to-disk directories; local, `pvc://`, `s3://`
or a Hub dataset (`hf://org/name`). Every problem becomes a DataValidationError naming the stage, the file, the line
(or row) and the columns the stage expects.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.render import StageConfig
from finetune_api.spec import DatasetSpec, uri_scheme
from finetune_trainer import storage
from finetune_trainer.errors import DataValidationError, StorageUnavailableError

_EXTENSION_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}


@dataclass(frozen=True)
class StageData:
    train: Any  # datasets.Dataset
    eval: Any  # datasets.Dataset
    columns: tuple[str, ...]  # the accepted column set the data matched


Row = dict[str, Any]


class _Source:
    """One data file (or directory), with the stage name for error messages."""

    def __init__(self, stage: str, uri: str, path: Path | None, fmt: str):
        self.stage, self.uri, self.path, self.format = stage, uri, path, fmt

    def error(self, where: str, problem: str, accepted: list[tuple[str, ...]]) -> DataValidationError:
        location = f"{self.uri}:{where}" if where else self.uri
        return DataValidationError(f"stage {self.stage!r}: {location}: {problem}; expected {_describe(accepted)}")


def _describe(accepted: list[tuple[str, ...]]) -> str:
    options = [f"{{{', '.join(columns)}}}" for columns in accepted]
    return "columns " + options[0] if len(options) == 1 else "columns " + " or ".join(options)


def _detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        if any(path.glob("*.txt")):
            return "text"
        return "arrow"
    return _EXTENSION_FORMATS.get(path.suffix.lower(), "unknown")


def _rows(source: _Source, accepted: list[tuple[str, ...]]) -> Iterator[tuple[str, Row]]:
    """(location, row) pairs; location is `line N` for text formats and `row N` otherwise."""
    path, fmt = source.path, source.format
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise source.error(
                        f"line {number}", f"malformed JSON ({exc.msg} at column {exc.colno})", accepted
                    ) from None
                if not isinstance(row, dict):
                    raise source.error(f"line {number}", f"expected a JSON object, got {type(row).__name__}", accepted)
                yield f"line {number}", row
    elif fmt == "json":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise source.error(
                f"line {exc.lineno}", f"malformed JSON ({exc.msg} at column {exc.colno})", accepted
            ) from None
        records = document.get("data") if isinstance(document, dict) else document
        if not isinstance(records, list):
            raise source.error("", "expected a JSON list of objects (or an object with a `data` list)", accepted)
        for index, row in enumerate(records):
            if not isinstance(row, dict):
                raise source.error(f"item {index}", f"expected a JSON object, got {type(row).__name__}", accepted)
            yield f"item {index}", row
    elif fmt == "csv":
        with path.open(encoding="utf-8", newline="") as handle:
            for index, row in enumerate(csv.DictReader(handle)):
                yield f"line {index + 2}", row
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {index}", row
    elif fmt == "text":
        if path.is_dir():
            for file in sorted(path.glob("*.txt")):
                yield file.name, {"text": file.read_text(encoding="utf-8")}
        else:
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        yield f"line {number}", {"text": line.rstrip("\n")}
    elif fmt == "arrow":
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise source.error("", f"not a `datasets` save-to-disk directory ({exc})", accepted) from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        for index, row in enumerate(loaded):
            yield f"row {index}", row
    else:
        raise source.error(
            "",
            f"unsupported format {fmt!r}: use .jsonl, .json, .parquet, .csv, .txt or a save-to-disk directory",
            accepted,
        )


def _hub_rows(source: _Source, revision: str | None) -> Iterator[tuple[str, Row]]:
    import datasets

    name = source.uri.removeprefix("hf://")
    loaded = datasets.load_dataset(name, split="train", revision=revision, token=os.environ.get("HF_TOKEN"))
    for index, row in enumerate(loaded):
        yield f"row {index}", row


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != []


def _valid_messages(messages: Any) -> bool:
    return isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )


# Columns that must hold text, and columns that may hold text or chat messages (the same kind in every row: Arrow
# stores one type per column). `messages` is checked on its own; `label` by the recipe that reads it.
_TEXT_COLUMNS = ("text", "instruction", "response", "context", "input")
_TEXT_OR_CHAT_COLUMNS = ("prompt", "completion", "chosen", "rejected")
_KIND_NAMES = {"text": "a string", "chat": "a list of {role, content} messages"}


def _kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    return "chat" if _valid_messages(value) else None


def _check_types(source: _Source, where: str, row: Row, kinds: dict[str, tuple[str, str]]) -> None:
    """Each known column holds the type the stage reads, and the same kind as in the first row that had it."""
    for column in (*_TEXT_COLUMNS, *_TEXT_OR_CHAT_COLUMNS):
        value = row.get(column)
        if value is None or (column in ("context", "input") and value == ""):
            continue
        kind = _kind(value)
        allowed = ("text",) if column in _TEXT_COLUMNS else ("text", "chat")
        first = kinds.get(column)
        if kind in allowed and (first is None or first[0] == kind):
            kinds.setdefault(column, (kind, where))
            continue
        expected = " or ".join(_KIND_NAMES[k] for k in allowed)
        if first is not None and kind in allowed:
            expected = f"{_KIND_NAMES[first[0]]}, as at {first[1]}"
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise DataValidationError(
            f"stage {source.stage!r}: {source.uri}:{where}: column {column!r} is {type(value).__name__} {shown}; "
            f"expected {expected}"
        )


def read_validated(
    stage: str,
    uri: str,
    spec: DatasetSpec,
    accepted: list[tuple[str, ...]],
    cache: Path,
    endpoint_url: str | None = None,
) -> tuple[list[Row], tuple[str, ...]]:
    """Rows of the file at `uri` with `spec.columns` renames applied, and the accepted column set they all match."""
    scheme = uri_scheme(uri)
    if scheme == "hf":
        source = _Source(stage, uri, None, "hub")
        rows_iter = _hub_rows(source, None)
    else:
        try:
            path = storage.fetch(uri, cache, endpoint_url)
        except Exception as exc:  # noqa: BLE001 - any storage failure means the data is unreachable
            if storage.is_transient(exc):
                raise StorageUnavailableError(f"stage {stage!r}: {uri}: cannot reach storage ({exc})") from None
            raise DataValidationError(
                f"stage {stage!r}: {uri}: cannot fetch dataset ({exc}); expected {_describe(accepted)}"
            ) from None
        source = _Source(stage, uri, path, "missing")
        if not path.exists():
            raise source.error("", "file not found", accepted)
        source.format = _detect_format(path, spec.format)
        rows_iter = _rows(source, accepted)
    rows: list[Row] = []
    matched: tuple[str, ...] | None = None
    kinds: dict[str, tuple[str, str]] = {}
    for where, raw in rows_iter:
        row = {spec.columns.get(key, key): value for key, value in raw.items()}
        if matched is None:
            matched = next((cols for cols in accepted if all(_present(row.get(c)) for c in cols)), None)
            if matched is None:
                renamed = f" after renaming {spec.columns}" if spec.columns else ""
                raise source.error(where, f"found columns {{{', '.join(row)}}}{renamed}", accepted)
        missing = [c for c in matched if not _present(row.get(c))]
        if missing:
            raise source.error(where, f"missing or empty {', '.join(repr(c) for c in missing)}", accepted)
        if "messages" in matched and not _valid_messages(row["messages"]):
            raise source.error(
                where, "`messages` must be a list of {role, content} objects with string content", accepted
            )
        _check_types(source, where, row, kinds)
        rows.append(row)
    if not rows:
        raise source.error("", "no rows", accepted)
    return rows, matched


def load_stage_data(config: StageConfig, accepted: list[tuple[str, ...]], cache: Path | None = None) -> StageData:
    """The stage's train and eval splits, validated against `accepted` (alternative column sets, first match wins)."""
    import datasets

    spec = config.stage.dataset
    cache = cache or Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator" / "data"))
    endpoint = config.storage.endpoint_url
    rows, columns = read_validated(config.stage.name, spec.uri, spec, accepted, cache, endpoint)
    if spec.validation_uri:
        eval_rows, _ = read_validated(config.stage.name, spec.validation_uri, spec, [columns], cache, endpoint)
        train, evaluation = datasets.Dataset.from_list(rows), datasets.Dataset.from_list(eval_rows)
    else:
        if len(rows) < 2:
            raise DataValidationError(
                f"stage {config.stage.name!r}: {spec.uri}: needs at least 2 rows to hold out a validation split"
            )
        try:
            split = datasets.Dataset.from_list(rows).train_test_split(
                test_size=spec.validation_split, seed=config.training.seed
            )
        except ValueError as exc:  # a split that would leave one side empty
            raise DataValidationError(
                f"stage {config.stage.name!r}: {spec.uri}: dataset.validationSplit {spec.validation_split:g} of "
                f"{len(rows)} rows leaves no training or no held-out rows ({exc}); change validationSplit or add rows"
            ) from None
        train, evaluation = split["train"], split["test"]
    if spec.max_samples is not None and len(train) > spec.max_samples:
        train = train.select(range(spec.max_samples))
    return StageData(train=train, eval=evaluation, columns=columns)
