"""Data hygiene (`stage.hygiene`): duplicate removal, decontamination against held-out rows and suites, PII
scrubbing, and the counts that reach the stage's metrics."""

import json

import pytest

from finetune_trainer import hygiene
from finetune_trainer.data import load_stage_data

pytestmark = pytest.mark.unit

SFT_COLUMNS = [("messages",), ("prompt", "completion"), ("instruction", "response"), ("text",)]


def test_pii_is_replaced_by_placeholders():
    text = (
        "Mail jane.doe@example.co.uk or call +44 20 7946 0958 / (555) 123-4567; key sk-proj-abcdefghijklmnop1234 and "
        "AKIAIOSFODNN7EXAMPLE, token 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08."
    )
    assert hygiene.scrub_text(text) == (
        "Mail <EMAIL> or call <PHONE> / <PHONE>; key <SECRET> and <SECRET>, token <SECRET>."
    )
    # The toy domain has nothing to scrub: short numbers and sums stay.
    assert hygiene.scrub_text("3 plus 4 is 7. 12 plus 30 is 42. In 2026, 1000 rows.") == (
        "3 plus 4 is 7. 12 plus 30 is 42. In 2026, 1000 rows."
    )
    rows, changed = hygiene.scrub_pii([{"messages": [{"role": "user", "content": "me@x.org"}]}, {"text": "no pii"}])
    assert changed == 1 and rows[0]["messages"][0]["content"] == "<EMAIL>"


def test_exact_and_near_duplicates_are_removed_keeping_the_first():
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    rows = [
        {"text": base},
        {"text": "  The QUICK brown fox jumps over the lazy dog near the river bank today "},  # exact after normalising
        {"text": base + " again"},  # trigram Jaccard 12/13 = 0.92
        {"text": "an entirely different sentence about addition facts and sums"},
    ]
    assert hygiene.jaccard(hygiene._trigrams(base), hygiene._trigrams(base + " again")) == pytest.approx(12 / 13)
    kept, exact, near = hygiene.deduplicate(rows, "exact", 0.8)
    assert (len(kept), exact, near) == (3, 1, 0)
    kept, exact, near = hygiene.deduplicate(rows, "near", 0.8)
    assert [r["text"] for r in kept] == [base, rows[3]["text"]] and (exact, near) == (1, 1)
    assert hygiene.deduplicate(rows, "near", 0.95)[2] == 0  # below the threshold: kept


def test_counts_reach_the_stage_data_and_contaminated_training_rows_are_dropped(render, tmp_path):
    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"} for a in range(4) for b in range(5)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))  # 3 exact duplicates
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[5:7]))  # 2 prompts also in training
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"prompt": "what is 3  plus 4?", "completion": " 7"}) + "\n")  # 1 more, normalised
    config = render(
        {
            "type": "sft",
            "dataset": {"uri": str(train), "validationUri": str(held_out)},
            "hygiene": {"deduplicate": "exact", "decontaminate": True, "scrubPii": True},
        },
        evaluation={"suites": [{"name": "sums", "uri": str(suite)}]},
    )
    data = load_stage_data(config, SFT_COLUMNS)
    assert data.hygiene == {
        "hygiene_pii_scrubbed": 0,
        "hygiene_exact_duplicates": 3,
        "hygiene_contaminated": 3,
    }
    assert len(data.train) == 20 - 3 and len(data.eval) == 2
    assert not {r["prompt"] for r in data.train} & {r["prompt"] for r in data.eval}
