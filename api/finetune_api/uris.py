"""Storage and model URIs: the one place their grammar is written down.

Each rule is a pair of RE2-compatible regular expressions (`when`, `pattern`), checked here by pydantic and restated,
unchanged, as a CEL rule (`!self.matches(when) || self.matches(pattern)`) in the CRD, so the API server and
`finetune run` give the same verdict on the same string. Plain local paths (no scheme) may use `..`: they name a path
on the machine that runs the stage, like any command-line argument. Inside a claim or a bucket they may not.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

# Long enough for deep object keys and local paths (Linux PATH_MAX is 4096), short enough for CEL cost estimates.
URI_MAX_LENGTH = 4096
DNS_LABEL_BODY = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
SCHEMES = ("s3", "pvc", "hf", "file")


@dataclass(frozen=True)
class UriRule:
    """`pattern` must (or, with `forbid`, must not) match wherever `when` matches (everywhere when it is empty);
    `schemes` limits the fields it applies to."""

    when: str
    pattern: str
    message: str
    forbid: bool = False
    schemes: tuple[str, ...] = SCHEMES

    def holds(self, uri: str) -> bool:
        if self.when and not re.search(self.when, uri):
            return True
        return bool(re.search(self.pattern, uri)) != self.forbid

    def cel(self) -> dict[str, str]:
        match = f"{'!' if self.forbid else ''}self.matches('{self.pattern}')"
        rule = f"!self.matches('{self.when}') || {match}" if self.when else match
        return {"rule": rule, "message": self.message}


_ANY_SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*:"
_WITH_SCHEME = r"^[a-z0-9]+://"

_COMMON_RULES = (
    UriRule("", r"^[ \t\r\n]|[ \t\r\n]$", "must not be blank or start or end with whitespace", forbid=True),
    UriRule(_WITH_SCHEME, r"(^|/)[.][.](/|$)", "must not contain `..` path segments", forbid=True),
    UriRule(r"^(s3|pvc)://", r"^[a-z0-9]+://.*//", "must not contain empty path segments (`//`)", forbid=True),
    UriRule(
        r"^s3://",
        r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$)",
        "must be s3://BUCKET/KEY with a valid bucket name (3-63 lowercase letters, digits, dots, hyphens)",
        schemes=("s3",),
    ),
    UriRule(
        r"^pvc://",
        rf"^pvc://{DNS_LABEL_BODY}(/|$)",
        "must be pvc://CLAIM/PATH with CLAIM a PersistentVolumeClaim name (a DNS-1123 label)",
        schemes=("pvc",),
    ),
    UriRule(
        r"^hf://",
        r"^hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$",
        "must be hf://NAME or hf://ORG/NAME (a Hugging Face Hub repository id)",
        schemes=("hf",),
    ),
    UriRule(r"^file:", r"^file://.", "must be file://PATH", schemes=("file",)),
)


def _scheme_rule(allowed: tuple[str, ...]) -> UriRule:
    expected = ", ".join(f"{s}://" for s in allowed)
    return UriRule(
        _ANY_SCHEME,
        rf"^({'|'.join(allowed)})://",
        f"unsupported scheme: expected {expected} or a local path",
    )


def rules(allowed: tuple[str, ...]) -> list[UriRule]:
    """The rules for a field that accepts the `allowed` schemes (plain local paths always count as `file`)."""
    return [_scheme_rule(allowed), *(r for r in _COMMON_RULES if set(r.schemes) & set(allowed))]


def check_uri(uri: str, allowed: tuple[str, ...]) -> str:
    """`uri` if every rule holds, else ValueError naming the first broken rule."""
    for rule in rules(allowed):
        if not rule.holds(uri):
            raise ValueError(f"{rule.message} (got {uri[:200]!r})")
    return uri


def cel_rules(allowed: tuple[str, ...]) -> list[dict[str, str]]:
    return [rule.cel() for rule in rules(allowed)]


def uri_scheme(uri: str) -> str:
    """`s3`, `pvc`, `hf`, or `file` for plain local paths (and `file://`)."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "file"


def pvc_parts(uri: str) -> tuple[str, str]:
    """`pvc://claim/a/b` -> (`claim`, `a/b`)."""
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, path


def pvc_path(uri: str, mount_root: Path) -> Path:
    """The path of `pvc://claim/a/b` under the claim's mount (`<mount_root>/claim/a/b`), which it can never leave."""
    claim, path = pvc_parts(uri)
    if not re.fullmatch(DNS_LABEL_BODY, claim):
        raise ValueError(f"{uri!r}: the claim name {claim!r} is not a DNS-1123 label")
    if ".." in path.split("/"):
        raise ValueError(f"{uri!r}: the path inside the claim must not contain `..` segments")
    # Rooted before normalising, so neither `..` nor a leading `/` can climb above the claim's mount.
    return mount_root / claim / posixpath.normpath("/" + path).lstrip("/")
