"""`finetune tiny-model`: a deterministic, offline-loadable Llama-shaped model with a locally trained BPE tokenizer."""

import pytest
from stage_helpers import DATA, run_cli

pytestmark = pytest.mark.unit


def test_tiny_model_is_deterministic_and_loads_offline(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("tiny-model", str(tmp_path / "again"), "--data-dir", str(DATA), timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    ids = tokenizer("What is 3 plus 4?").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == "What is 3 plus 4?"
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_model_needs_its_data_dir(tmp_path):
    result = run_cli("tiny-model", str(tmp_path / "m"), "--data-dir", str(tmp_path / "missing"), timeout=180)
    assert result.returncode != 0 and "does not exist" in result.stderr
