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

It lives in the runtime because the runtime offers emotion-from-text too, but it is the one runtime
feature that needs torch + transformers: they are imported only when a QwenEmotion is created, and
their absence is a clear InputError naming the alternatives. Importing this module imports neither.
export/qwen_emotion.py writes the tiny random demo model in the same directory layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from runtime.emotion.answer import emotions_from_response
from runtime.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "文本情感分类"
THINK_END_ID = 151668            # '</think>' in the Qwen3 vocabulary (hard-coded upstream)
THINK_END_TEXT = "</think>"
UPSTREAM_MAX_NEW_TOKENS = 32768
REQUIRED_FILES = ("config.json", "tokenizer_config.json")


def _import_llm_stack() -> tuple[Any, tuple[Any, Any]]:
    """torch and the transformers auto classes, or an InputError saying what to install or use instead."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise InputError(f"emotion from text runs the checkpoint's emotion LLM, which needs torch and "
                         f"transformers ({err.name or err} is not installed): pip install torch==2.13.0 "
                         f"transformers==4.52.1, or give --emo-vector / --emo-audio instead") from err
    return torch, (AutoModelForCausalLM, AutoTokenizer)


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

    def __init__(self, model_dir: str | Path, device: Any = None, dtype: Any = None,
                 max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS) -> None:
        self.model_dir = Path(model_dir)
        _check_directory(self.model_dir)
        torch, (AutoModelForCausalLM, AutoTokenizer) = _import_llm_stack()
        self._torch = torch
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

    def respond(self, text: str) -> str:
        """The model's decoded answer to `text`, with any thinking part removed."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("emotion text is empty")
        inputs = self.tokenizer([self.prompt(text)], return_tensors="pt")
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        with self._torch.no_grad():
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


