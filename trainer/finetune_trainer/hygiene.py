"""Data hygiene before training (`stage.hygiene`): duplicate removal, train/held-out decontamination, PII scrubbing.

Pure functions on validated rows; `data.load_stage_data` applies them and counts what they removed or changed.
Texts are compared normalised: lower case, whitespace collapsed. Near-duplicates are word-trigram sets with a
Jaccard similarity of at least the threshold, found through MinHash banding (candidates share a band of signature
values) and then checked exactly, so the cost stays near linear in the number of rows.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

Row = dict[str, Any]

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# International or grouped numbers: +44 20 7946 0958, (555) 123-4567, 555-123-4567, 030 1234 5678.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w])")
# Provider key prefixes (OpenAI/Stripe `sk-`/`pk_`, GitHub `ghp_`, Slack `xox?-`, AWS `AKIA`), or any 32+ character
# run of letters, digits, `-` and `_` that mixes letters and digits.
SECRET = re.compile(
    r"\b(?:(?:sk|pk|rk)[-_][A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})\b"
    r"|\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b"
)
_PLACEHOLDERS = ((SECRET, "<SECRET>"), (EMAIL, "<EMAIL>"), (PHONE, "<PHONE>"))

_SIGNATURE = 32
_BANDS = 16  # 2 values a band: pairs at Jaccard 0.8 share a band with probability 1 - (1 - 0.64)^16 > 0.99


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    if isinstance(value, dict):
        return [text for key in sorted(value) for text in _strings(value[key])]
    return []


def row_text(row: Row) -> str:
    """Every text the row carries, column by column, normalised."""
    return normalise(" \n ".join(text for key in sorted(row) for text in _strings(row[key])))


def prompt_text(row: Row) -> str:
    """What the model is asked (prompt, instruction and context, question, the user turns, or the text), normalised."""
    if "messages" in row and row["messages"]:
        return normalise(" ".join(m["content"] for m in row["messages"] if m.get("role") != "assistant"))
    for columns in (("prompt",), ("instruction", "context", "input"), ("question",), ("text",)):
        texts = [text for column in columns for text in _strings(row.get(column))]
        if texts:
            return normalise(" ".join(texts))
    return row_text(row)


def _trigrams(text: str) -> frozenset[str]:
    words = text.split()
    return frozenset(" ".join(words[i : i + 3]) for i in range(max(len(words) - 2, 1)))


def _signature(shingles: frozenset[str]) -> tuple[int, ...]:
    """MinHash: per seeded hash function, the smallest hash of any shingle (equal with probability = Jaccard)."""
    encoded = [shingle.encode() for shingle in shingles]
    return tuple(
        min(
            int.from_bytes(hashlib.blake2b(s, digest_size=8, salt=seed.to_bytes(16, "little")).digest())
            for s in encoded
        )
        for seed in range(_SIGNATURE)
    )


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def deduplicate(rows: list[Row], mode: str, threshold: float) -> tuple[list[Row], int, int]:
    """(rows kept in order, exact duplicates removed, near-duplicates removed); the first of a group is kept."""
    if mode == "off":
        return rows, 0, 0
    seen: set[str] = set()
    kept: list[Row] = []
    exact = near = 0
    buckets: dict[tuple, list[frozenset[str]]] = {}
    width = _SIGNATURE // _BANDS
    for row in rows:
        text = row_text(row)
        if text in seen:
            exact += 1
            continue
        seen.add(text)
        if mode == "near":
            shingles = _trigrams(text)
            signature = _signature(shingles)
            keys = [(band, signature[band * width : (band + 1) * width]) for band in range(_BANDS)]
            candidates = {id(other): other for key in keys for other in buckets.get(key, [])}
            if any(jaccard(shingles, other) >= threshold for other in candidates.values()):
                near += 1
                continue
            for key in keys:
                buckets.setdefault(key, []).append(shingles)
        kept.append(row)
    return kept, exact, near


def decontaminate(train: list[Row], held_out_prompts: set[str]) -> tuple[list[Row], int]:
    """Training rows whose prompt is not among `held_out_prompts` (normalised), and how many were removed."""
    kept = [row for row in train if prompt_text(row) not in held_out_prompts]
    return kept, len(train) - len(kept)


def scrub_text(text: str) -> str:
    for pattern, placeholder in _PLACEHOLDERS:
        text = pattern.sub(placeholder, text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    return value


def scrub_pii(rows: list[Row]) -> tuple[list[Row], int]:
    """Rows with e-mails, phone numbers and key-like strings replaced by placeholders, and how many rows changed."""
    scrubbed = [_scrub(row) for row in rows]
    return scrubbed, sum(1 for before, after in zip(rows, scrubbed) if before != after)
