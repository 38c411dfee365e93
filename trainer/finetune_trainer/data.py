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
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_api.render import StageConfig
from finetune_api.spec import DatasetSpec, uri_scheme
from finetune_trainer import hygiene, storage
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
    columns: tuple[str, ...]  # the accepted column set the data matched (the first source's, for a mixture)
    # The task of each training and held-out row, in order (all `default` for a single dataset).
    train_tasks: tuple[str, ...] = ()
    eval_tasks: tuple[str, ...] = ()
    # `stage.hygiene` counts for the stage's metrics (`hygiene_*`), only of the steps that are switched on.
    hygiene: dict[str, int] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """The stage's task names, in first-seen order."""
        return list(dict.fromkeys((*self.train_tasks, *self.eval_tasks)))


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


def _clean(config: StageConfig, rows: list[Row], counts: dict[str, int]) -> list[Row]:
    """PII scrubbing, then duplicate removal, as `stage.hygiene` declares; adds to `counts`."""
    options = config.stage.hygiene
    if options.scrub_pii:
        rows, changed = hygiene.scrub_pii(rows)
        counts["hygiene_pii_scrubbed"] = counts.get("hygiene_pii_scrubbed", 0) + changed
    if options.deduplicate != "off":
        rows, exact, near = hygiene.deduplicate(rows, options.deduplicate, options.near_threshold)
        counts["hygiene_exact_duplicates"] = counts.get("hygiene_exact_duplicates", 0) + exact
        if options.deduplicate == "near":
            counts["hygiene_near_duplicates"] = counts.get("hygiene_near_duplicates", 0) + near
    return rows


# Suites are read for decontamination with any of their row shapes (text, prompt/completion, multiple choice).
_SUITE_COLUMNS = [("text",), ("prompt", "completion"), ("question", "choices", "answer")]


def _held_out_prompts(config: StageConfig, eval_rows: list[Row], cache: Path) -> set[str]:
    prompts = {hygiene.prompt_text(row) for row in eval_rows}
    for suite in config.suites:
        spec = DatasetSpec(uri=suite.uri)
        rows, _ = read_validated(config.stage.name, suite.uri, spec, _SUITE_COLUMNS, cache, config.storage.endpoint_url)
        prompts.update(hygiene.prompt_text(row) for row in rows)
    return prompts


def _split(
    config: StageConfig,
    path: str,
    spec: DatasetSpec,
    accepted: list[tuple[str, ...]],
    cache: Path,
    counts: dict[str, int],
) -> tuple[list[Row], list[Row], tuple[str, ...]]:
    """(train rows, held-out rows, matched columns) of one dataset, validated, cleaned and split by its settings."""
    import datasets

    stage, endpoint = config.stage.name, config.storage.endpoint_url
    try:
        rows, columns = read_validated(stage, spec.uri, spec, accepted, cache, endpoint)
        rows = _clean(config, rows, counts)
        if spec.validation_uri:
            eval_rows, _ = read_validated(stage, spec.validation_uri, spec, [columns], cache, endpoint)
            eval_rows = _clean(config, eval_rows, counts)
            train_rows = rows
        else:
            if len(rows) < 2:
                raise DataValidationError(
                    f"stage {stage!r}: {spec.uri}: needs at least 2 rows to hold out a validation split"
                )
            try:
                split = datasets.Dataset.from_list(rows).train_test_split(
                    test_size=spec.validation_split, seed=config.training.seed
                )
            except ValueError as exc:  # a split that would leave one side empty
                raise DataValidationError(
                    f"stage {stage!r}: {spec.uri}: {path}.validationSplit {spec.validation_split:g} of "
                    f"{len(rows)} rows leaves no training or no held-out rows ({exc}); change validationSplit or add rows"
                ) from None
            train_rows, eval_rows = split["train"].to_list(), split["test"].to_list()
    except DataValidationError as exc:
        if path == "dataset":
            raise
        raise DataValidationError(f"spec.stages[{config.stage_index}].{path}.uri: {exc}") from None
    if spec.max_samples is not None:
        train_rows = train_rows[: spec.max_samples]
    return train_rows, eval_rows, columns


def _shares(sources: list[tuple[str, DatasetSpec, list[Row]]]) -> list[int]:
    """Training rows each source contributes: `samples`, or its weighted share of the weighted sources' total."""
    weighted = [(getattr(spec, "weight", None), len(rows)) for _, spec, rows in sources]
    total = sum(size for weight, size in weighted if weight is not None)
    weight_sum = sum(weight for weight, _ in weighted if weight is not None)
    shares = []
    for (_, spec, rows), (weight, _) in zip(sources, weighted):
        samples = getattr(spec, "samples", None)
        if samples is not None:
            shares.append(samples)
        elif weight is not None:
            shares.append(max(1, round(total * weight / weight_sum)))
        else:
            shares.append(len(rows))
    return shares


def _take(rows: list[Row], count: int, rng: random.Random) -> list[Row]:
    """`count` rows: a seeded shuffle, cut, or repeated whole (then topped up) when the source has fewer."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    repeats, rest = divmod(count, len(rows))
    return [rows[i] for i in order * repeats + order[:rest]]


def load_stage_data(
    config: StageConfig, accepted: list[tuple[str, ...]], cache: Path | None = None, mixed_columns: bool = False
) -> StageData:
    """The stage's train and eval splits, validated against `accepted` (alternative column sets, first match wins).

    A mixture (`stage.datasets`) is validated and split source by source, then each source's training rows are cut or
    repeated to its share and the sources are interleaved (a seeded shuffle) or concatenated (`stage.mixing`). The
    held-out split is every source's held-out rows, in source order. Sources must match the same column set unless
    `mixed_columns` (the recipe then converts row by row).
    """
    import datasets

    cache = cache or Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator" / "data"))
    loaded = []
    counts: dict[str, int] = {}
    for task, path, spec in config.stage.data_sources():
        train_rows, eval_rows, columns = _split(config, path, spec, accepted, cache, counts)
        if loaded and not mixed_columns and columns != loaded[0][3]:
            raise DataValidationError(
                f"spec.stages[{config.stage_index}].{path}.uri: {spec.uri}: columns {{{', '.join(columns)}}}, but "
                f"the first dataset has {{{', '.join(loaded[0][3])}}}; the datasets of a {config.stage.type} mixture "
                "must share one column set"
            )
        loaded.append((task, spec, train_rows, columns, eval_rows))
    if config.stage.hygiene.decontaminate:
        held_out = _held_out_prompts(config, [row for *_, rows in loaded for row in rows], cache)
        counts["hygiene_contaminated"] = 0
        for index, (task, spec, train_rows, columns, eval_rows) in enumerate(loaded):
            kept, removed = hygiene.decontaminate(train_rows, held_out)
            if not kept:
                raise DataValidationError(
                    f"stage {config.stage.name!r}: {spec.uri}: every training row's prompt is also held out "
                    "(hygiene.decontaminate); hold out other rows (validationUri) or switch decontaminate off"
                )
            counts["hygiene_contaminated"] += removed
            loaded[index] = (task, spec, kept, columns, eval_rows)
    if config.stage.dataset is not None:
        task, _, train_rows, columns, eval_rows = loaded[0]
        return StageData(
            train=datasets.Dataset.from_list(train_rows),
            eval=datasets.Dataset.from_list(eval_rows),
            columns=columns,
            train_tasks=(task,) * len(train_rows),
            eval_tasks=(task,) * len(eval_rows),
            hygiene=counts,
        )
    rng = random.Random(config.training.seed)
    shares = _shares([(task, spec, rows) for task, spec, rows, _, _ in loaded])
    mixed = [(task, row) for (task, _, rows, _, _), share in zip(loaded, shares) for row in _take(rows, share, rng)]
    if config.stage.mixing == "interleave":
        rng.shuffle(mixed)
    held_out = [(task, row) for task, _, _, _, rows in loaded for row in rows]
    return StageData(
        train=_rows_dataset([row for _, row in mixed]),
        eval=_rows_dataset([row for _, row in held_out]),
        columns=loaded[0][3],
        train_tasks=tuple(task for task, _ in mixed),
        eval_tasks=tuple(task for task, _ in held_out),
        hygiene=counts,
    )


def _rows_dataset(rows: list[Row]):
    """A Dataset of rows that may have different columns (a mixed-column mixture): absent columns are None."""
    import datasets

    names = list(dict.fromkeys(key for row in rows for key in row))
    return datasets.Dataset.from_list([{name: row.get(name) for name in names} for row in rows])
