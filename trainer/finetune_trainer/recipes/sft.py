"""Supervised fine-tuning with TRL's SFTTrainer; loss on completions (assistant turns) only by default.

Row formats (first match wins):
  {"messages": [{"role", "content"}, ...]}           chat, rendered with the chat template (assistant turns trained)
  {"prompt", "completion"}                           plain prompt/completion
  {"instruction", "context"?, "response"}            alpaca: `### Instruction` / `### Context` / `### Response`
  {"text"}                                           replay: the whole text is the completion (a mixture only)
`stage.sft.template` forces a rendering (`chat`, `alpaca`, `plain`); `auto` picks by the columns above. The sources of
a mixture may differ in columns (e.g. instructions plus replayed CPT text); each row is rendered by its own columns.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import (
    eval_loss,
    eval_loss_before,
    generation_metrics,
    loss_metrics,
    task_losses,
)

ACCEPTED_COLUMNS = [("messages",), ("prompt", "completion"), ("instruction", "response"), ("text",)]


def row_columns(row: dict[str, Any]) -> tuple[str, ...]:
    """The accepted column set a (validated) row carries, first match wins as in validation."""
    return next(cols for cols in ACCEPTED_COLUMNS if all(row.get(c) not in (None, "", []) for c in cols))


def alpaca_prompt(instruction: str, context: str | None) -> str:
    prompt = f"### Instruction:\n{instruction}\n\n"
    if context:
        prompt += f"### Context:\n{context}\n\n"
    return prompt + "### Response:\n"


def _prompt_and_answer(row: dict[str, Any], columns: tuple[str, ...], template: str) -> tuple[str, str]:
    if columns == ("prompt", "completion"):
        if template == "alpaca":
            return alpaca_prompt(row["prompt"], None), row["completion"]
        return row["prompt"], row["completion"]
    instruction, context, response = row["instruction"], row.get("context") or row.get("input"), row["response"]
    if template == "plain":
        return (f"{instruction}\n{context}\n" if context else f"{instruction}\n"), response
    return alpaca_prompt(instruction, context), response


def to_trl_rows(rows: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Rows in TRL's conversational ({messages} or chat prompt/completion) or prompt/completion form."""
    kinds = {row_columns(row) == ("messages",) or template == "chat" for row in rows}
    if len(kinds) > 1:
        raise ConfigError(
            "a mixture mixes `messages` rows with other rows; TRL trains one form per stage: convert the sources to "
            "one form (all `messages`, or all prompt/completion, instruction/response or text)"
        )
    converted = []
    for row in rows:
        columns = row_columns(row)
        if columns == ("messages",):
            if template in ("alpaca", "plain"):
                raise ConfigError(f"sft.template {template!r} cannot render `messages` rows; use `chat` or `auto`")
            converted.append({"messages": row["messages"]})
        elif columns == ("text",):
            if template == "chat":
                raise ConfigError("sft.template 'chat' cannot render `text` (replay) rows; use `auto` or `plain`")
            converted.append({"prompt": "", "completion": row["text"]})
        else:
            prompt, answer = _prompt_and_answer(row, columns, template)
            if template == "chat":
                converted.append(
                    {
                        "prompt": [{"role": "user", "content": prompt}],
                        "completion": [{"role": "assistant", "content": answer}],
                    }
                )
            else:
                converted.append({"prompt": prompt, "completion": answer})
    return converted


def generation_pairs(rows: list[dict[str, Any]], tokenizer, tasks: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(prompt text as the model sees it, reference answer, task) for held-out rows with a prompt (not replay)."""
    prompts, references, kept = [], [], []
    for row, task in zip(rows, tasks):
        if row.get("prompt") == "":
            continue
        kept.append(task)
        if "messages" in row:
            turns = row["messages"]
            last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
            if last is None:
                kept.pop()
                continue
            prompts.append(tokenizer.apply_chat_template(turns[:last], tokenize=False, add_generation_prompt=True))
            references.append(turns[last]["content"])
        elif isinstance(row["prompt"], list):
            prompts.append(tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True))
            references.append(row["completion"][0]["content"])
        else:
            prompts.append(row["prompt"])
            references.append(row["completion"])
    return prompts, references, kept


def run(ctx: StageContext) -> dict[str, float]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    options = ctx.config.stage.sft
    template = options.template if options else "auto"
    completion_only = options.completion_only_loss if options else True
    data = ctx.data(ACCEPTED_COLUMNS, mixed_columns=True)
    tokenizer = ctx.tokenizer()
    if ctx.config.stage.dataset is not None and data.columns == ("text",):
        raise ConfigError(
            f"stage {ctx.config.stage.name!r}: `text` rows are replay data for an sft mixture (`datasets`); a "
            "stage of text alone is continued pre-training: use type cpt"
        )
    conversational = data.columns == ("messages",) or template == "chat"
    if conversational and not tokenizer.chat_template:
        raise ConfigError(
            f"stage {ctx.config.stage.name!r}: the tokenizer has no chat template; set spec.model.chatTemplate (chatml, llama3 or Jinja)"
        )
    train = datasets.Dataset.from_list(to_trl_rows(list(data.train), template))
    held_out_rows = to_trl_rows(list(data.eval), template)
    held_out = datasets.Dataset.from_list(held_out_rows)
    ctx.log(f"{len(train)} training / {len(held_out)} held-out rows as {data.columns}, template {template}")

    args = ctx.training_args(
        SFTConfig,
        packing=bool(ctx.config.training.packing),
        completion_only_loss=completion_only if not data.columns == ("messages",) else None,
        assistant_only_loss=completion_only and data.columns == ("messages",),
        dataset_num_proc=None,
        neftune_noise_alpha=ctx.config.training.neftune_noise_alpha,
    )
    trainer = SFTTrainer(
        model=ctx.causal_lm(),
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    guards.check_rows_left(ctx.config, trainer, len(train), len(held_out))
    output = trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())
    metrics = loss_metrics(eval_loss_before(trainer), eval_loss(trainer), output)
    metrics.update(task_losses(trainer, held_out_rows, list(data.eval_tasks), datasets.Dataset.from_list))
    if ctx.config.stage.generation_eval is not None:
        prompts, references, tasks = generation_pairs(held_out_rows, tokenizer, list(data.eval_tasks))
        metrics.update(generation_metrics(ctx, trainer.model, tokenizer, prompts, references, tasks))
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics
