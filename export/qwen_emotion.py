"""The tiny random demo emotion LLM (a Qwen3 causal LM + byte-level tokenizer) in the layout of the
checkpoint's `qwen0.6bemo4-merge/`, for tests and the demo checkpoint. Its answers are garbage, so the
calm fallback of the answer parsing applies. The emotion LLM itself (prompt, generation, parsing) is
runtime/emotion/llm.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Demo directory: a tiny random Qwen3 causal LM with a byte-level tokenizer, in the original layout
# ----------------------------------------------------------------------------------------------------

# A ChatML template written for the demo (role markers, then the assistant turn; an empty thinking block
# when enable_thinking is false, which is how Qwen3 disables thinking).
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
DEMO_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEMO_ADDED_TOKENS = ("<think>", "</think>")


def _demo_tokenizer() -> Any:
    """Byte-level BPE over the 256 byte symbols, no merges: any text (Chinese too) tokenizes, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(DEMO_SPECIAL_TOKENS))
    core.add_tokens(list(DEMO_ADDED_TOKENS))
    return Qwen2TokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, chat_template=DEMO_CHAT_TEMPLATE)


@torch.no_grad()
def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded weights: matrices N(0, 1/fan_in) (embeddings N(0, 1)), norm scales 1, biases 0."""
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0 if "norm" in name else 0.0)
        else:
            std = 1.0 if "embed" in name else param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def write_demo_qwen_emotion(directory: str | Path, generator: torch.Generator, hidden_size: int = 32,
                            layers: int = 1) -> Path:
    """Write a tiny random Qwen3 emotion-LLM directory (config, generation config, safetensors weights,
    tokenizer.json / tokenizer_config.json with the chat template / vocab.json / merges.txt); ~0.1 MB.

    Greedy decoding (`do_sample: false` in generation_config.json) makes its (meaningless) answers
    deterministic.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _demo_tokenizer()
    tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    heads = 2
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
        head_dim=hidden_size // heads, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        sliding_window=None, torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    _randomize(model, generator)
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(directory))
    log.info("wrote demo emotion LLM to %s", directory)
    return directory
