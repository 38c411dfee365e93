"""Load a FineTuneJob manifest from YAML, turning validation errors into `file:line: field: problem` messages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_api.spec import FineTuneJob


class ManifestError(ValueError):
    """A manifest that cannot be used; `problems` holds one `file:line: field: message` line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid FineTuneJob {source}:\n" + "\n".join(f"  {p}" for p in problems))


_PATH_PREFIX = re.compile(r"^((?:[A-Za-z_][A-Za-z0-9_]*|\[\d+\])(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*): (.*)$", re.S)


def _split_path(text: str) -> list[str | int]:
    return [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\[\d+\]", text)]


def _line_of(node: yaml.Node | None, loc: list[str | int]) -> tuple[int | None, list[str | int]]:
    """Deepest YAML line for `loc`; also returns the part of loc that was found."""
    line = node.start_mark.line + 1 if node is not None else None
    found: list[str | int] = []
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
            if child is not None:
                line = next(k for k, v in node.value if v is child).start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
            line = child.start_mark.line + 1
        if child is None:
            break
        found.append(key)
        node = child
    return line, found


def field_path(loc: list[str | int]) -> str:
    """`spec.stages[1].rewardFrom` from a location list."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_error(error: dict[str, Any]) -> tuple[list[str | int], str]:
    """(location as the user wrote it, problem) for one pydantic error, with cross-field paths folded into the location."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    message = error["msg"].removeprefix("Value error, ")
    # Cross-field validators put the offending path at the start of their message: `stages[2].rewardFrom: ...`.
    nested = _PATH_PREFIX.match(message)
    if nested:
        loc = loc + _split_path(nested.group(1))
        message = nested.group(2)
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field is missing"
    elif error["type"] in ("literal_error", "enum"):
        message = f"{message} (got {error.get('input')!r})"
    return loc, message


def parse_manifest(text: str, source: str = "<manifest>") -> FineTuneJob:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ManifestError(source, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(data, dict):
        raise ManifestError(
            source, [f"{source}:1: expected a FineTuneJob mapping with apiVersion, kind, metadata and spec"]
        )
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc, message = describe_error(error)
            line, _ = _line_of(root, loc)
            problems.append(f"{source}:{line}: {field_path(loc) or '(root)'}: {message}")
        raise ManifestError(source, problems) from None


def load_manifest(path: str | Path) -> FineTuneJob:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_manifest(text, str(path))
