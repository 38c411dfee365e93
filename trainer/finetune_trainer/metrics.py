"""The final-metric schema of every stage type, and generation-quality metrics: word-level ROUGE-L (F-measure, own
LCS) and sacreBLEU corpus BLEU."""

from __future__ import annotations

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


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (0 when either side is empty)."""
    predicted, expected = prediction.lower().split(), reference.lower().split()
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


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) with one reference per prediction."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)
