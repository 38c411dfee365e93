"""How SFT rows become TRL rows: prompt/completion, alpaca headings, chat messages, forced templates."""

import pytest

from finetune_trainer.errors import ConfigError
from finetune_trainer.recipes.sft import generation_pairs, to_trl_rows

pytestmark = pytest.mark.unit


def test_prompt_completion_stays_plain_or_gets_alpaca_headings():
    rows = [{"prompt": "What is 3 plus 4?", "completion": " 7"}]
    assert to_trl_rows(rows, "auto") == rows
    assert to_trl_rows(rows, "alpaca") == [
        {"prompt": "### Instruction:\nWhat is 3 plus 4?\n\n### Response:\n", "completion": " 7"}
    ]


def test_instruction_context_response_renders_alpaca():
    rows = [
        {"instruction": "Add the numbers.", "context": "3 and 4", "response": "7"},
        {"instruction": "Add 1 and 1.", "response": "2"},
    ]
    assert to_trl_rows(rows, "auto") == [
        {"prompt": "### Instruction:\nAdd the numbers.\n\n### Context:\n3 and 4\n\n### Response:\n", "completion": "7"},
        {"prompt": "### Instruction:\nAdd 1 and 1.\n\n### Response:\n", "completion": "2"},
    ]
    assert to_trl_rows(rows[:1], "plain") == [{"prompt": "Add the numbers.\n3 and 4\n", "completion": "7"}]


def test_chat_template_turns_prompt_completion_into_turns():
    rows = to_trl_rows([{"prompt": "What is 3 plus 4?", "completion": "7"}], "chat")
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "What is 3 plus 4?"}],
            "completion": [{"role": "assistant", "content": "7"}],
        }
    ]


def test_messages_need_a_chat_rendering():
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert to_trl_rows(rows, "auto") == rows
    with pytest.raises(ConfigError, match="cannot render `messages`"):
        to_trl_rows(rows, "alpaca")


def test_generation_pairs_end_at_the_last_assistant_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}]
    prompts, references, tasks = generation_pairs(
        [
            {"messages": messages},
            {"prompt": "", "completion": "replayed text"},
            {"prompt": "What is 1 plus 1?", "completion": " 2"},
        ],
        tokenizer,
        ["chat", "replay", "sums"],
    )
    assert prompts == ["<|im_start|>user\nWhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n", "What is 1 plus 1?"]
    assert references == ["7", " 2"]
    assert tasks == ["chat", "sums"]  # replay rows (no prompt) are not generated for
