"""Supervised fine-tuning with TRL's SFTTrainer; loss on completions (assistant turns) only by default.

Row formats (first match wins):
  {"messages": [{"role", "content"}, ...]}           chat, rendered with the chat template (assistant turns trained)
  {"prompt", "completion"}                           plain prompt/completion
  {"instruction", "context"?, "response"}            alpaca: `### Instruction` / `### Context` / `### Response`
`stage.sft.template` forces a rendering (`chat`, `alpaca`, `plain`); `auto` picks by the columns above.
"""

from __future__ import annotations

from typing import Any

from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes import guards
from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import eval_loss, eval_loss_before, generation_metrics, loss_metrics

ACCEPTED_COLUMNS = [("messages",), ("prompt", "completion"), ("instruction", "response")]


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


def to_trl_rows(rows: list[dict[str, Any]], columns: tuple[str, ...], template: str) -> list[dict[str, Any]]:
    """Rows in TRL's conversational ({messages} or chat prompt/completion) or prompt/completion form."""
    if columns == ("messages",):
        if template in ("alpaca", "plain"):
            raise ConfigError(f"sft.template {template!r} cannot render `messages` rows; use `chat` or `auto`")
        return [{"messages": row["messages"]} for row in rows]
    converted = []
    for row in rows:
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


def generation_pairs(rows: list[dict[str, Any]], tokenizer) -> tuple[list[str], list[str]]:
    """(prompt text as the model sees it, reference answer) for held-out rows."""
    prompts, references = [], []
    for row in rows:
        if "messages" in row:
            turns = row["messages"]
            last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
            if last is None:
                continue
            prompts.append(tokenizer.apply_chat_template(turns[:last], tokenize=False, add_generation_prompt=True))
            references.append(turns[last]["content"])
        elif isinstance(row["prompt"], list):
            prompts.append(tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True))
            references.append(row["completion"][0]["content"])
        else:
            prompts.append(row["prompt"])
            references.append(row["completion"])
    return prompts, references


def run(ctx: StageContext) -> dict[str, float]:
    import datasets
    from trl import SFTConfig, SFTTrainer

    options = ctx.config.stage.sft
    template = options.template if options else "auto"
    completion_only = options.completion_only_loss if options else True
    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    conversational = data.columns == ("messages",) or template == "chat"
    if conversational and not tokenizer.chat_template:
        raise ConfigError(
            f"stage {ctx.config.stage.name!r}: the tokenizer has no chat template; set spec.model.chatTemplate (chatml, llama3 or Jinja)"
        )
    train = datasets.Dataset.from_list(to_trl_rows(list(data.train), data.columns, template))
    held_out_rows = to_trl_rows(list(data.eval), data.columns, template)
    held_out = datasets.Dataset.from_list(held_out_rows)
    ctx.log(f"{len(train)} training / {len(held_out)} held-out rows as {data.columns}, template {template}")

    args = ctx.training_args(
        SFTConfig,
        packing=bool(ctx.config.training.packing),
        completion_only_loss=completion_only if not data.columns == ("messages",) else None,
        assistant_only_loss=completion_only and data.columns == ("messages",),
        dataset_num_proc=None,
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
    if ctx.config.stage.generation_eval is not None:
        prompts, references = generation_pairs(held_out_rows, tokenizer)
        metrics.update(generation_metrics(ctx, trainer.model, tokenizer, prompts, references))
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics
