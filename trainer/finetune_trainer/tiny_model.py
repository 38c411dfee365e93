"""A tiny random-init Llama-shaped model with a BPE tokenizer trained on the example data.

Used by the quickstart and the tests so that nothing is downloaded: everything is built locally and deterministically,
then saved with save_pretrained so AutoTokenizer/AutoModelForCausalLM load it offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from finetune_trainer.chat_templates import CHATML

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512
SEED = 0

# Headings and role names the recipes render, so that they tokenize compactly even if absent from the data.
_TEMPLATE_TEXT = [
    "### Instruction:\n",
    "### Context:\n",
    "### Response:\n",
    "system\n",
    "user\n",
    "assistant\n",
    "Question: Answer:",
]


def _corpus(data_dir: Path) -> list[str]:
    texts: list[str] = list(_TEMPLATE_TEXT)
    for path in sorted(data_dir.glob("*")):
        if path.suffix == ".txt":
            texts.extend(line for line in path.read_text().splitlines() if line.strip())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    texts.extend(str(value) for value in json.loads(line).values())
    if len(texts) == len(_TEMPLATE_TEXT):
        raise FileNotFoundError(f"no .txt or .jsonl files to train the tokenizer on in {data_dir}")
    return texts


def build_tokenizer(data_dir: Path):
    """Byte-level BPE (no unknown tokens) with pad/bos/eos and ChatML turn markers, wrapped for transformers."""
    from transformers import PreTrainedTokenizerFast

    special = [PAD, BOS, EOS, *CHAT_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(data_dir), trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    # A bos token opens every sequence, like Llama's tokenizer.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def write_tiny_model(
    out_dir: str | Path, data_dir: str | Path = "examples/data", hidden: int = 64, layers: int = 2
) -> Path:
    """Build and save the tokenizer and model to `out_dir`; returns the directory."""
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    tokenizer = build_tokenizer(data_dir)
    model = build_model(
        len(tokenizer),
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        hidden=hidden,
        layers=layers,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
