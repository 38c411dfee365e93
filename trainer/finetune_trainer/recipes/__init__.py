"""Stage recipes: one module per stage type, each exposing `run(ctx: StageContext) -> dict[str, float]`.

Modules are imported on first use, so a recipe that fails to import only breaks stages of its own type.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

from finetune_api.spec import StageType
from finetune_trainer.errors import ConfigError


class _LazyRecipes(Mapping[str, ModuleType]):
    """stage type -> recipe module, importing `finetune_trainer.recipes.<type>` on access."""

    def __getitem__(self, stage_type: str) -> ModuleType:
        if stage_type not in StageType._value2member_map_:
            raise KeyError(stage_type)
        try:
            module = importlib.import_module(f"{__name__}.{stage_type}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{stage_type}":
                raise
            raise ConfigError(f"stage type {stage_type!r} has no recipe in this trainer build") from None
        if not callable(getattr(module, "run", None)):
            raise ConfigError(f"recipe module {module.__name__} has no run(ctx) function")
        return module

    def __iter__(self) -> Iterator[str]:
        return iter(t.value for t in StageType)

    def __len__(self) -> int:
        return len(StageType)


RECIPES: Mapping[str, ModuleType] = _LazyRecipes()
