"""The installed distribution's version, shown by `finetune --version` and `finetune-operator --version`."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "finetune-operator"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
