"""Chat templates selectable by name in `spec.model.chatTemplate`.

The `{% generation %}` markers let the SFT trainer compute loss on assistant turns only.
"""

from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}

# Special tokens each named template relies on; added to the tokenizer (and the embeddings resized) when missing.
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


def resolve_chat_template(value: str) -> tuple[str, list[str]]:
    """A name (`chatml`, `llama3`) or a Jinja string -> (template, special tokens it needs)."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value], TEMPLATE_TOKENS[value]
    return value, []


# Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Gemma, Phi-3). A tokenizer whose chat
# template writes one of them stops generating there, not only at its end-of-document eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
