"""Evaluation suites: held-out sets every stage is scored on before and after training, and the forgetting gate.

`StageContext.save_final` calls `score_and_gate` with the trained model, so every recipe is covered in one place. The
"before" score loads the stage's input model once more (evaluation only); each rank scores the whole suite (suites are
small by design, `maxSamples` cuts them), so no gather is needed and every rank reaches the same verdict. Under ZeRO-3
rank 0 alone scores them, on its whole copy of the trained model, and hands its verdict to the other ranks.

Scoring is log-likelihood of a continuation after a context, summed over the continuation's tokens:
  text suites            context = "" (the document starts after an EOS, as in CPT's packed stream), continuation =
                         the text; or context = prompt, continuation = completion. Loss = total NLL / total tokens.
  multipleChoice suites  context = question, continuation = " " + choice; the prediction is the choice with the
                         highest log-likelihood per token (length-normalised, so long choices are not penalised).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api.render import StageConfig
from finetune_api.spec import DatasetSpec, EvaluationSuite
from finetune_trainer.data import read_validated
from finetune_trainer.errors import DataValidationError, ForgettingError

TEXT_COLUMNS = [("text",), ("prompt", "completion")]
CHOICE_COLUMNS = [("question", "choices", "answer")]
_BATCH = 16


@dataclass(frozen=True)
class ChoiceRow:
    context: str
    choices: tuple[str, ...]
    answer: int
    task: str


def load_suite(config: StageConfig, suite: EvaluationSuite, cache: Path) -> list[Any]:
    """The suite's rows, validated: (context, continuation) pairs for text, ChoiceRow for multiple choice."""
    return read_suite(config.stage.name, suite, cache, config.storage.endpoint_url)


def read_suite(stage: str, suite: EvaluationSuite, cache: Path, endpoint_url: str | None = None) -> list[Any]:
    """`load_suite` for a stage named `stage` (also what `finetune validate` checks)."""
    accepted = CHOICE_COLUMNS if suite.type == "multipleChoice" else TEXT_COLUMNS
    field = f"evaluation suite {suite.name!r}"
    rows, columns = read_validated(stage, suite.uri, DatasetSpec(uri=suite.uri), accepted, cache, endpoint_url)
    rows = rows[: suite.max_samples] if suite.max_samples else rows
    if suite.type == "text":
        if columns == ("text",):
            return [("", row["text"]) for row in rows]
        return [(row["prompt"], row["completion"]) for row in rows]
    parsed = []
    for number, row in enumerate(rows, start=1):
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise DataValidationError(f"{field}: {suite.uri}: row {number}: `choices` must be a list of 2+ strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataValidationError(
                f"{field}: {suite.uri}: row {number}: `answer` is {answer!r}; expected the index (0-{len(choices) - 1}) "
                "of the right choice"
            )
        parsed.append(ChoiceRow(row["question"], tuple(choices), answer, str(row.get("task") or "default")))
    return parsed


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each continuation after its context, in batches."""
    import torch

    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    sequences: list[tuple[list[int], int]] = []
    for context, continuation in pairs:
        context_ids = start + tokenizer(context, add_special_tokens=False)["input_ids"] if context else list(start)
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = (context_ids + continuation_ids)[-max_length:]
        sequences.append((ids, min(len(continuation_ids), len(ids) - 1)))
    results: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for offset in range(0, len(sequences), _BATCH):
                batch = sequences[offset : offset + _BATCH]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (ids, _) in enumerate(batch):
                    input_ids[row, : len(ids)] = torch.tensor(ids)
                    attention[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
                logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
                targets = input_ids[:, 1:].to(device)
                token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                for row, (ids, scored) in enumerate(batch):
                    values = token_logprobs[row, len(ids) - 1 - scored : len(ids) - 1]
                    results.append((float(values.sum()), scored))
    finally:
        model.train(was_training)
    return results


def text_loss(model, tokenizer, pairs: list[tuple[str, str]], max_length: int) -> float:
    """Mean negative log-likelihood per continuation token over the whole suite."""
    scored = continuation_logprobs(model, tokenizer, pairs, max_length)
    tokens = sum(count for _, count in scored)
    return -sum(total for total, _ in scored) / max(tokens, 1)


def choice_accuracy(model, tokenizer, rows: list[ChoiceRow], max_length: int) -> dict[str, float]:
    """Accuracy overall (`accuracy`) and per task (`accuracy_<task>`); each choice scored by log-likelihood per token."""
    pairs = [(row.context, " " + choice) for row in rows for choice in row.choices]
    scored = iter(continuation_logprobs(model, tokenizer, pairs, max_length))
    correct: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        per_token = [total / max(count, 1) for total, count in (next(scored) for _ in row.choices)]
        correct[row.task].append(max(range(len(per_token)), key=per_token.__getitem__) == row.answer)
    everything = [hit for hits in correct.values() for hit in hits]
    result = {"accuracy": sum(everything) / len(everything)}
    if len(correct) > 1 or "default" not in correct:
        result.update({f"accuracy_{task}": sum(hits) / len(hits) for task, hits in sorted(correct.items())})
    return result


def score(model, tokenizer, suite: EvaluationSuite, rows: list[Any], max_length: int) -> dict[str, float]:
    """The suite's metrics for one model, keyed without the suite prefix and before/after suffix."""
    if suite.type == "multipleChoice":
        return choice_accuracy(model, tokenizer, rows, max_length)
    loss = text_loss(model, tokenizer, rows, max_length)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def regression(suite: EvaluationSuite, before: dict[str, float], after: dict[str, float]) -> float:
    """How much worse the suite got: loss up for text, accuracy down for multiple choice."""
    if suite.type == "multipleChoice":
        return before["accuracy"] - after["accuracy"]
    return after["loss"] - before["loss"]


def suite_metrics(suite: EvaluationSuite, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """`<suite>_<metric>_before` / `_after` for every metric, and `<suite>_regression`."""
    metrics = {f"{suite.name}_{key}_before": value for key, value in before.items()}
    metrics.update({f"{suite.name}_{key}_after": value for key, value in after.items()})
    metrics[f"{suite.name}_regression"] = regression(suite, before, after)
    return metrics


def check_forgetting(config: StageConfig, metrics: dict[str, float]) -> None:
    """Fail the stage when a suite with `maxRegression` got worse than that (every failing suite is named)."""
    failures = []
    for suite in config.suites:
        allowed, worse = suite.max_regression, metrics.get(f"{suite.name}_regression")
        if allowed is None or worse is None or worse <= allowed:
            continue
        key = "accuracy" if suite.type == "multipleChoice" else "loss"
        failures.append(
            f"suite {suite.name!r} {key} went from {metrics[f'{suite.name}_{key}_before']:.4f} to "
            f"{metrics[f'{suite.name}_{key}_after']:.4f}, {worse:.4f} worse, more than its maxRegression {allowed:g}"
        )
    if failures:
        raise ForgettingError(
            f"stage {config.stage.name!r} forgot: {'; '.join(failures)}. Mix replay data from the earlier stages into "
            "this stage's `datasets`, lower training.learningRate or train fewer steps; the model was not saved as the "
            "stage output (checkpoints are kept)"
        )


def score_and_gate(ctx, model, tokenizer, metrics: dict[str, float]) -> None:
    """Score the stage's suites on its input model and on `model`, add the metrics, and apply the gates."""
    config: StageConfig = ctx.config
    if not config.suites:
        return
    max_length = config.training.max_length
    loaded = {suite.name: load_suite(config, suite, ctx.cache_dir) for suite in config.suites}
    # The stage's input model with the stage's own tokenizer (`spec.model.tokenizer` for the first stage).
    before_model = ctx.causal_lm(trainable=False)
    before_tokenizer = ctx.tokenizer()
    before = {s.name: score(before_model, before_tokenizer, s, loaded[s.name], max_length) for s in config.suites}
    del before_model
    for suite in config.suites:
        after = score(model, tokenizer, suite, loaded[suite.name], max_length)
        metrics.update(suite_metrics(suite, before[suite.name], after))
        key = "accuracy" if suite.type == "multipleChoice" else "loss"
        ctx.log(
            f"suite {suite.name}: {key} {before[suite.name][key]:.4f} -> {after[key]:.4f}"
            + (f" (maxRegression {suite.max_regression:g})" if suite.max_regression is not None else "")
        )
    check_forgetting(config, metrics)
