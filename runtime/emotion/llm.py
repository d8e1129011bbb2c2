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
4. parse exactly as upstream (JSON or the regex fallback, the sad/melancholic swap, label-style answers
   as one-hot emotions, clamp, calm fallback; a non-numeric score is an EmotionAnswerError):
   `runtime.emotion.emotions_from_response` (torch-free, shared by both pipelines and any other LLM backend).

This runs on the host (transformers), not as an exported graph (UPSTREAM §4.2). Upstream loads the model
in fp16 with `device_map="auto"`; here the default is fp16 on CUDA and fp32 on CPU (fp16 matmuls on
CPU are slow and not what a CPU user wants); `dtype` overrides it.

It lives in the runtime because the runtime offers emotion-from-text too. It is the one runtime module
that needs the transformers stack (tests/test_layering.py allows `transformers` here and nowhere else in
the runtime), imported only when a QwenEmotion is created; a missing transformers or torch is a clear
InputError naming the alternatives. Our code never imports torch, even here ("the runtime never imports
torch" holds without exception): it speaks transformers' own API — dtypes as strings ("float16",
"float32", "auto"), devices as strings, `transformers.utils.is_torch_cuda_available()` for the default
device, tokenizer tensors moved with `.to(device)`; `generate` already runs without gradients
(transformers decorates it with `torch.no_grad()`). transformers imports torch inside its own package.
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


DTYPES = ("auto", "float16", "bfloat16", "float32")


def _import_llm_stack() -> tuple[Any, Any, Any]:
    """transformers' auto classes and `is_torch_cuda_available`, or an InputError saying what to install or
    use instead. transformers imports without torch (its model classes then refuse to load), so torch's
    presence is asked of transformers rather than imported here."""
    hint = ("pip install torch==2.13.0 transformers==4.52.1, or give --emo-vector / --emo-audio instead")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import is_torch_available, is_torch_cuda_available
    except ImportError as err:
        raise InputError(f"emotion from text runs the checkpoint's emotion LLM, which needs torch and "
                         f"transformers ({err.name or err} is not installed): {hint}") from err
    if not is_torch_available():
        raise InputError("emotion from text runs the checkpoint's emotion LLM, which needs torch and "
                         f"transformers (torch is not installed): {hint}")
    return AutoModelForCausalLM, AutoTokenizer, is_torch_cuda_available


def choose_dtype(device: str, dtype: Any = None) -> str:
    """The dtype name transformers loads the weights in: `dtype` ("float16", "bfloat16", "float32", "auto";
    a torch dtype's name like "torch.float16" is accepted too), else fp16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return "float16" if device.startswith("cuda") else "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"emotion LLM dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return name


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

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = UPSTREAM_MAX_NEW_TOKENS) -> None:
        """`device`: "cpu", "cuda", "cuda:1", ... (default: CUDA when torch sees it); `dtype`: see
        `choose_dtype`."""
        self.model_dir = Path(model_dir)
        _check_directory(self.model_dir)
        AutoModelForCausalLM, AutoTokenizer, cuda_available = _import_llm_stack()
        self.device = str(device) if device is not None else ("cuda" if cuda_available() else "cpu")
        self.dtype = choose_dtype(self.device, dtype)
        self.max_new_tokens = int(max_new_tokens)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), torch_dtype=self.dtype,
                                                              local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.model_dir}: cannot load the emotion LLM: {err}") from err
        self.model.to(self.device).eval()
        self.end_id = think_end_id(self.tokenizer)
        log.info("loaded emotion LLM from %s (%s, %s)", self.model_dir, self.device, self.dtype)

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
        generated = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,    # no_grad inside
                                        max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.eos_token_id)
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


