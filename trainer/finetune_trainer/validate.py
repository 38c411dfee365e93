"""`finetune validate`: everything that can be checked before training, for every stage at once; trains nothing.

It parses each manifest, renders every stage's config, reads every local dataset (existence, format, the columns and
types the stage type accepts, the validation file, enough rows for a split), and checks the base model, tokenizer,
chat template and storage location. `preflight(job)` is the same check for a loaded job: `finetune run` calls it
before the first stage, so a broken line in stage 3's file is found before stage 1 trains.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from finetune_api.manifest import ManifestError, load_manifest, load_manifests
from finetune_api.render import StageConfig, render_stage
from finetune_api.runtime import with_runtime
from finetune_api.spec import DatasetSpec, FineTuneJob
from finetune_api.uris import uri_scheme
from finetune_trainer import modeling, storage
from finetune_trainer.data import read_validated
from finetune_trainer.errors import StageError

RECIPES_DIR = Path(__file__).parent / "recipes"
EXIT_INVALID = 2


def accepted_columns(stage_type: str) -> list[tuple[str, ...]]:
    """The column sets a recipe accepts (its ACCEPTED_COLUMNS), read from its source: importing a recipe loads torch
    and trl, which takes longer than every other check together."""
    tree = ast.parse((RECIPES_DIR / f"{stage_type}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ACCEPTED_COLUMNS" for t in node.targets):
            return [tuple(columns) for columns in ast.literal_eval(node.value)]
    raise LookupError(f"recipe {stage_type} declares no ACCEPTED_COLUMNS")


class Checker:
    """Collects problems (what stops the job) and notes (what could not be checked from here)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.problems: list[str] = []
        self.notes: list[str] = []

    def reachable_here(self, uri: str, what: str) -> bool:
        """Whether `uri` can be read from this machine; a note says why not otherwise."""
        scheme = uri_scheme(uri)
        if scheme in ("s3", "hf"):
            self.notes.append(f"{what} {uri}: remote, not checked here (the stage checks it when it starts)")
            return False
        if scheme == "pvc" and not storage.pvc_root().is_dir():
            self.notes.append(f"{what} {uri}: the claim is not mounted here ({storage.pvc_root()}), not checked")
            return False
        return True

    def model(self, field: str, uri: str, endpoint_url: str | None) -> None:
        if not self.reachable_here(uri, field):
            return
        try:
            resolved = modeling.resolve(uri, self.cache, endpoint_url)
        except StageError as exc:
            self.problems.append(f"{field}: {exc}")
            return
        path = Path(resolved)
        if path.exists() and not (path / "config.json").is_file() and field.endswith("source"):
            self.problems.append(f"{field}: {uri}: no config.json in {path}; expected a Hugging Face model directory")
        elif not path.exists():
            self.notes.append(f"{field} {uri}: a Hub id, not checked here")

    def dataset(self, field: str, config: StageConfig, spec: DatasetSpec) -> None:
        accepted = accepted_columns(config.stage.type)
        if not self.reachable_here(spec.uri, f"{field}.uri"):
            return
        try:
            rows, columns = read_validated(config.stage.name, spec.uri, spec, accepted, self.cache)
        except StageError as exc:
            self.problems.append(f"{field}.uri: {exc}")
            return
        if spec.validation_uri is None:
            if len(rows) < 2:
                self.problems.append(f"{field}.uri: {spec.uri}: needs at least 2 rows to hold out a validation split")
        elif self.reachable_here(spec.validation_uri, f"{field}.validationUri"):
            try:
                read_validated(config.stage.name, spec.validation_uri, spec, [columns], self.cache)
            except StageError as exc:
                self.problems.append(f"{field}.validationUri: {exc}")

    def storage_root(self, uri: str) -> None:
        if not self.reachable_here(uri, "spec.storage.uri"):
            return
        path = storage.local_path(uri)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            self.problems.append(f"spec.storage.uri: {uri}: {existing} is a file, expected a directory")
        elif existing is not None and not os.access(existing, os.W_OK):
            self.problems.append(f"spec.storage.uri: {uri}: {existing} is not writable")


def preflight(job: FineTuneJob, cache: Path | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) for a loaded job: every stage rendered and its inputs checked, nothing trained."""
    cache = cache or Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-operator" / "data"))
    check = Checker(cache)
    spec = job.spec
    check.model("spec.model.source", spec.model.source, spec.storage.endpoint_url)
    if spec.model.tokenizer:
        check.model("spec.model.tokenizer", spec.model.tokenizer, spec.storage.endpoint_url)
    check.storage_root(spec.storage.uri)
    for index, stage in enumerate(spec.stages):
        try:
            config = render_stage(job.metadata.name, spec, stage.name)
        except (ValueError, KeyError) as exc:
            check.problems.append(f"spec.stages[{index}]: cannot render the stage config: {exc}")
            continue
        for _, path, dataset in stage.data_sources():
            check.dataset(f"spec.stages[{index}].{path}", config, dataset)
    for index, suite in enumerate(spec.evaluation.suites):
        field = f"spec.evaluation.suites[{index}].uri"
        if check.reachable_here(suite.uri, field):
            from finetune_trainer.recipes.suites import read_suite

            try:
                read_suite(spec.stages[0].name, suite, check.cache, spec.storage.endpoint_url)
            except StageError as exc:
                check.problems.append(f"{field}: {exc}")
    return check.problems, check.notes


def validate_files(
    paths: Iterable[str], all_documents: bool = False, out=sys.stdout, err=sys.stderr, runtime: str | None = None
) -> int:
    """Check every manifest (merged with `runtime` when it names one); print every problem; EXIT_INVALID when there is
    any, else 0."""
    failed = False
    for path in paths:
        try:
            jobs = load_manifests(path) if all_documents else [load_manifest(path)]
            jobs = [with_runtime(job, path, runtime) for job in jobs]
        except ManifestError as exc:
            print("\n".join(exc.problems), file=err)
            failed = True
            continue
        for job in jobs:
            problems, notes = preflight(job)
            for note in notes:
                print(f"{path}: {job.metadata.name}: note: {note}", file=out)
            for problem in problems:
                print(f"{path}: {job.metadata.name}: {problem}", file=err)
            if problems:
                failed = True
            else:
                print(f"{path}: {job.metadata.name}: valid ({len(job.spec.stages)} stages)", file=out)
    return EXIT_INVALID if failed else 0
