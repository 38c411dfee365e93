"""Continued pre-training: causal LM loss on raw text packed into fixed-length blocks of `training.maxLength` tokens.

Data: `.txt` (one document per line, or a directory of .txt files, one document each) or any format with a `text`
column. Documents are joined with the EOS token, so the model learns where they end.
"""

from __future__ import annotations

from finetune_trainer.recipes.context import StageContext
from finetune_trainer.recipes.evaluation import (
    eval_loss,
    eval_loss_before,
    generation_metrics,
    loss_metrics,
    task_losses,
)

ACCEPTED_COLUMNS = [("text",)]


def pack_blocks(texts: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """Concatenate tokenized documents (EOS between them) and cut into blocks; a final short block is kept."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    return [block for block in blocks if len(block) > 1]


class BlockCollator:
    """Pads blocks to the longest in the batch; labels are the inputs with padding masked out (-100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = feature["input_ids"]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _split_for_generation(texts: list[str], tasks: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Held-out documents as (first half of the words, the rest, task): the model should continue the text."""
    prompts, references, kept = [], [], []
    for text, task in zip(texts, tasks):
        words = text.split()
        if len(words) >= 3:
            cut = len(words) // 2
            if words[cut - 1].endswith((".", "!", "?")):
                cut += 1  # at a sentence end, stopping is a fair continuation; ask for one mid-sentence
            prompts.append(" ".join(words[:cut]))
            references.append(" ".join(words[cut:]))
            kept.append(task)
    return prompts, references, kept


def run(ctx: StageContext) -> dict[str, float]:
    import datasets
    from transformers import Trainer, TrainingArguments

    data = ctx.data(ACCEPTED_COLUMNS)
    tokenizer = ctx.tokenizer()
    block_size = ctx.config.training.max_length
    train = datasets.Dataset.from_dict({"input_ids": pack_blocks(list(data.train["text"]), tokenizer, block_size)})
    held_out = datasets.Dataset.from_dict({"input_ids": pack_blocks(list(data.eval["text"]), tokenizer, block_size)})
    ctx.log(
        f"{len(data.train)} documents -> {len(train)} blocks of {block_size} tokens; {len(held_out)} held-out blocks"
    )

    model = ctx.causal_lm()
    trainer = Trainer(
        model=model,
        args=ctx.training_args(TrainingArguments, remove_unused_columns=False),
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=BlockCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=ctx.callbacks(),
    )
    output = trainer.train(resume_from_checkpoint=ctx.resume_checkpoint())
    metrics = loss_metrics(eval_loss_before(trainer), eval_loss(trainer), output)
    texts, tasks = list(data.eval["text"]), list(data.eval_tasks)

    def blocks(rows: list[dict]):
        return datasets.Dataset.from_dict({"input_ids": pack_blocks([r["text"] for r in rows], tokenizer, block_size)})

    metrics.update(task_losses(trainer, [{"text": text} for text in texts], tasks, blocks))
    if ctx.config.stage.generation_eval is not None:
        prompts, references, kept = _split_for_generation(texts, tasks)
        metrics.update(generation_metrics(ctx, trainer.model, tokenizer, prompts, references, kept))
    ctx.save_final(trainer.model, tokenizer, metrics)
    return metrics
