"""The final-metric schema of every stage type, and generation-quality metrics: exact match, word-level ROUGE-L
(F-measure over the longest common subsequence, computed here) and sacreBLEU BLEU with effective order."""

from __future__ import annotations

import re

_HELD_OUT_LOSS = ("eval_loss_before", "eval_loss_after")
_PAIRS = (*_HELD_OUT_LOSS, "eval_reward_accuracy", "eval_reward_margin")
_RL = ("reward_mean_first", "reward_mean_last", "kl_mean")

# Metrics every stage of a type reports when it succeeds (it may add others, e.g. rougeL and bleu with
# generationEval). Documented in docs/trainer.md, checked before every final save and against the docs by a test.
STAGE_METRICS: dict[str, tuple[str, ...]] = {
    "cpt": (*_HELD_OUT_LOSS, "perplexity_after"),
    "sft": (*_HELD_OUT_LOSS, "perplexity_after"),
    "reward": _PAIRS,
    "dpo": _PAIRS,
    "kto": _PAIRS,
    "orpo": _PAIRS,
    "ppo": _RL,
    "grpo": _RL,
}


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_tokens(text: str) -> list[str]:
    """Tokens as the `rouge-score` package's default tokenizer makes them: lower case, runs of letters and digits
    (everything else separates), no stemming."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over `rouge_tokens` (0 when either side has no token), as `rouge-score`'s `rougeL` F-measure."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not expected:
        return 0.0
    lcs = _lcs_length(predicted, expected)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction equals the reference after stripping and collapsing whitespace, else 0.0."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def _bleu():
    from sacrebleu.metrics import BLEU

    # Effective order: n-gram orders that no hypothesis is long enough to have are left out of the geometric mean
    # instead of zeroing it, so short answers (one or two words) get a meaningful score.
    return BLEU(effective_order=True)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) with effective order and one reference per prediction."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return float(_bleu().corpus_score(predictions, [references]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacreBLEU sentence BLEU (0-100) with effective order, for per-example error analysis."""
    return float(_bleu().sentence_score(prediction, [reference]).score)


def worst_predictions(records: list[dict], per_task: int = 3) -> dict[str, list[dict]]:
    """The `per_task` lowest-scoring records of `predictions.jsonl` per task: lowest rougeL, then bleu, first."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(str(record.get("task", "default")), []).append(record)
    return {
        task: sorted(rows, key=lambda r: (r.get("rougeL", 0.0), r.get("bleu", 0.0)))[:per_task]
        for task, rows in by_task.items()
    }
