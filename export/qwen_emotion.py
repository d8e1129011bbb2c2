"""Emotion from text: the checkpoint's Qwen3 emotion classifier (`qwen0.6bemo4-merge/`) -> 8 scores.

upstream: indextts/infer_v2.py:QwenEmotion (`__init__`, `inference`, `convert`, `clamp_score`);
UPSTREAM.md §2.11. The model answers a chat whose system turn is "文本情感分类" ("text emotion
classification") with a JSON object of Chinese emotion labels and scores. The steps:

1. chat template `[system: 文本情感分类, user: text]`, `add_generation_prompt=True,
   enable_thinking=False`, tokenized as a batch of one;
2. `generate(max_new_tokens=32768, pad_token_id=eos)`, sampling settings from the model directory's
   `generation_config.json` (nothing else is passed);
3. keep the generated ids after the LAST `</think>` (id 151668 in the Qwen3 vocabulary), decode with
   `skip_special_tokens=True`;
4. parse, swap sad/melancholic, clamp, fall back to calm: `runtime.emotion.emotions_from_response`
   (torch-free, so it is shared with any other LLM backend).

This runs on the host (transformers), not as an exported graph (UPSTREAM §4.2). Upstream loads the model
in fp16 with `device_map="auto"`; here the default is fp16 on CUDA and fp32 on CPU (fp16 matmuls on
CPU are slow and not what a CPU user wants); `dtype` overrides it.

`write_demo_qwen_emotion` writes a tiny random Qwen3 model + byte-level tokenizer in the same directory
layout, for tests and the demo checkpoint. Its answers are garbage, so the calm fallback applies.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from runtime.emotion import emotions_from_response
from runtime.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "文本情感分类"
THINK_END_ID = 151668            # '</think>' in the Qwen3 vocabulary (hard-coded upstream)
THINK_END_TEXT = "</think>"
UPSTREAM_MAX_NEW_TOKENS = 32768
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


def _check_directory(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: emotion LLM directory (qwen0.6bemo4-merge) not found; "
                              "emotion from text needs it (or use an emotion audio / vector instead)")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise CheckpointError(f"{model_dir}: emotion LLM directory is incomplete, missing {', '.join(missing)}")


def think_end_id(tokenizer: Any) -> int | None:
    """The id after whose last occurrence the answer starts.

    Upstream hard-codes 151668; that id is used whenever the vocabulary has it. A smaller vocabulary
    (the demo tokenizer) falls back to the id of the token text '</think>', if it has one.
    """
    if len(tokenizer) > THINK_END_ID:
        return THINK_END_ID
    token_id = tokenizer.convert_tokens_to_ids(THINK_END_TEXT)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


def strip_thinking(output_ids: list[int], end_id: int | None) -> list[int]:
    """The ids after the last `end_id` (all of them when it does not occur)."""
    if end_id is None or end_id not in output_ids:
        return output_ids
    return output_ids[len(output_ids) - output_ids[::-1].index(end_id):]


class QwenEmotion:
    """Text -> {happy, angry, sad, afraid, disgusted, melancholic, surprised, calm} through the emotion LLM."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        _check_directory(self.model_dir)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.max_new_tokens = int(max_new_tokens)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), torch_dtype=dtype,
                                                              local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.model_dir}: cannot load the emotion LLM: {err}") from err
        self.model.to(self.device).eval()
        self.end_id = think_end_id(self.tokenizer)
        log.info("loaded emotion LLM from %s (%s, %s)", self.model_dir, self.device, dtype)

    def prompt(self, text: str) -> str:
        """The chat-templated prompt string (no thinking block requested)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=False)

    @torch.no_grad()
    def respond(self, text: str) -> str:
        """The model's decoded answer to `text`, with any thinking part removed."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("emotion text is empty")
        inputs = self.tokenizer([self.prompt(text)], return_tensors="pt")
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        generated = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        max_new_tokens=self.max_new_tokens,
                                        pad_token_id=self.tokenizer.eos_token_id)
        output_ids = generated[0][input_ids.shape[1]:].tolist()
        answer_ids = strip_thinking(output_ids, self.end_id)
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True)

    def inference(self, text: str) -> dict[str, float]:
        """upstream `QwenEmotion.inference`: the 8 scores in vector order (English keys)."""
        content = self.respond(text)
        log.debug("emotion LLM answer for %r: %r", text, content)
        return emotions_from_response(content, text)

    def vector(self, text: str) -> list[float]:
        """The 8 scores as a list (what infer uses as emo_vector)."""
        return list(self.inference(text).values())

    __call__ = inference


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
