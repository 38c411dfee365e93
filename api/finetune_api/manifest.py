"""Load FineTuneJob manifests from YAML as strictly as the API server does, with `file:line: field: problem` errors.

What kubectl and the API server do, this does too: keys are strings, a duplicate key is an error, a `null` value means
the field is absent, empty documents (a trailing `---`) are skipped, timestamps stay strings, values are never coerced
(the spec models are strict) and only the camelCase wire names are accepted.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune_api.spec import FineTuneJob

Loc = tuple[str | int, ...]


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` holds one `file:line: field: message` line per error, by line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid FineTuneJob {source}:\n" + "\n".join(f"  {p}" for p in problems))


_PATH_PREFIX = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*|\[\d+\])(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*): (.*)$", re.S)


def _split_path(text: str) -> list[str | int]:
    return [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\[\d+\]", text)]


def field_path(loc: typing.Iterable[str | int]) -> str:
    """`spec.stages[1].rewardFrom` from a location list."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(str(value))} characters)"


def describe_error(error: dict[str, Any]) -> tuple[list[str | int], str]:
    """(location as the user wrote it, problem) for one pydantic error, with cross-field paths folded into the location."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    message = error["msg"].removeprefix("Value error, ")
    # Cross-field validators put the offending path at the start of their message: `stages[2].rewardFrom: ...`.
    nested = _PATH_PREFIX.match(message)
    if nested:
        loc = loc + _split_path(nested.group(1))
        message = nested.group(2)
    keyed = "[key]" in loc
    if keyed:
        # A map key that breaks a rule: name the map, and the key in the message.
        at = loc.index("[key]")
        message = f"key {_shown(loc[at - 1])}: {message}"
        loc = loc[: at - 1]
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required field is missing"
    elif kind != "value_error" and "input" in error and not isinstance(error["input"], (dict, list)) and not keyed:
        message = f"{message} (got {_shown(error['input'])})"
    return loc, message


# ---------------------------------------------------------------------------------------------------------------------
# YAML as kubectl reads it.


class _Loader(yaml.SafeLoader):
    """SafeLoader without timestamp resolution: the API server receives `2026-01-01` as a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Document:
    """One YAML document turned into plain data, remembering the line of every key and list item."""

    def __init__(self, node: yaml.Node, source: str):
        self.source = source
        self.lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        self.problems: list[tuple[int, str]] = []
        self._constructor = _Loader("")
        self.data = self._convert(node, ())

    def _convert(self, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    self._problem(line, loc, "a mapping key must be a plain string")
                    continue
                key = key_node.value
                if key in first_line:
                    self._problem(
                        line, (*loc, key), f"duplicate key (first at line {first_line[key]}, again at line {line})"
                    )
                    continue
                first_line[key] = line
                self.lines[(*loc, key)] = line
                if value_node.tag == "tag:yaml.org,2002:null":
                    continue  # an explicit null is an absent field, as the API server prunes it
                out[key] = self._convert(value_node, (*loc, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self.lines[(*loc, index)] = item.start_mark.line + 1
                items.append(self._convert(item, (*loc, index)))
            return items
        return self._constructor.construct_object(node, deep=True)

    def _problem(self, line: int, loc: Loc, message: str) -> None:
        self.problems.append((line, f"{self.source}:{line}: {field_path(loc) or '(root)'}: {message}"))

    def line_of(self, loc: typing.Sequence[str | int]) -> int:
        """The line of the deepest part of `loc` that is in the document."""
        for end in range(len(loc), -1, -1):
            if tuple(loc[:end]) in self.lines:
                return self.lines[tuple(loc[:end])]
        return self.lines[()]


# ---------------------------------------------------------------------------------------------------------------------
# "Did you mean": the wire names a model accepts at a location.


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _wire_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {field.alias or name: field.annotation for name, field in model.model_fields.items()}


def _model_at(loc: typing.Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = FineTuneJob
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        annotation = _wire_fields(model).get(part)
        found = _models_in(annotation) if annotation is not None else []
        model = found[0] if found else None
    return model


def _suggestion(loc: list[str | int]) -> str:
    """`; did you mean `learningRate`?` for a misspelt or snake_case field, or where a misplaced field belongs."""
    model = _model_at(loc[:-1])
    key = loc[-1]
    if model is None or not isinstance(key, str):
        return ""
    fields = _wire_fields(model)
    squashed = {name.lower(): name for name in fields}
    close = squashed.get(key.replace("_", "").replace("-", "").lower()) or next(
        iter(difflib.get_close_matches(key, list(fields), n=1, cutoff=0.7)), None
    )
    if close:
        return f"; did you mean `{close}`?"
    for name, annotation in fields.items():
        for child in _models_in(annotation):
            if key in _wire_fields(child):
                return f"; `{key}` is a field of `{field_path([*loc[:-1], name])}`"
    return f"; expected one of {', '.join(f'`{name}`' for name in fields)}"


# ---------------------------------------------------------------------------------------------------------------------


def _validate(document: _Document) -> tuple[FineTuneJob | None, list[tuple[int, str]]]:
    problems = list(document.problems)
    if not isinstance(document.data, dict):
        line = document.lines[()]
        problems.append(
            (line, f"{document.source}:{line}: expected a FineTuneJob mapping with apiVersion, kind, metadata and spec")
        )
        return None, problems
    try:
        job = FineTuneJob.model_validate(document.data, by_alias=True, by_name=False)
    except ValidationError as exc:
        for error in exc.errors():
            loc, message = describe_error(error)
            if error["type"] == "extra_forbidden":
                message += _suggestion(loc)
            line = document.line_of(loc)
            problems.append((line, f"{document.source}:{line}: {field_path(loc) or '(root)'}: {message}"))
        return None, problems
    return (job, problems) if not problems else (None, problems)


def parse_manifests(text: str, source: str = "<manifest>") -> list[FineTuneJob]:
    """Every FineTuneJob in a YAML stream; ManifestError with every problem of every document, sorted by line."""
    try:
        # An empty document (a trailing `---`) is skipped, as kubectl skips it.
        nodes = [
            node
            for node in yaml.compose_all(text, Loader=_Loader)
            if node is not None and node.tag != "tag:yaml.org,2002:null"
        ]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ManifestError(source, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not nodes:
        raise ManifestError(source, [f"{source}:1: no FineTuneJob in the file"])
    jobs: list[FineTuneJob] = []
    problems: list[tuple[int, str]] = []
    for node in nodes:
        job, found = _validate(_Document(node, source))
        problems += found
        if job is not None:
            jobs.append(job)
    if problems:
        raise ManifestError(source, [text for _, text in sorted(problems, key=lambda p: p[0])])
    return jobs


def parse_manifest(text: str, source: str = "<manifest>") -> FineTuneJob:
    """The one FineTuneJob in `text` (a file with several is refused: pass them one by one, or use `--all`)."""
    jobs = parse_manifests(text, source)
    if len(jobs) > 1:
        names = ", ".join(job.metadata.name for job in jobs)
        raise ManifestError(
            source, [f"{source}: holds {len(jobs)} FineTuneJobs ({names}); expected one per file, or use --all"]
        )
    return jobs[0]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ManifestError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None


def load_manifest(path: str | Path) -> FineTuneJob:
    return parse_manifest(_read(Path(path)), str(path))


def load_manifests(path: str | Path) -> list[FineTuneJob]:
    return parse_manifests(_read(Path(path)), str(path))
