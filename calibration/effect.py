"""The end-to-end effect of a precision choice: synthesize with emulated graphs and compare with float32.

Two synthesizers on the same export directory and seed: the float32 graphs (ONNX Runtime, the eager
model within ~1e-5) and the emulated graphs of calibration/fp16_emulation.py (or any other directory of
graphs with the same contracts, e.g. INT8 QDQ graphs). Per calibration item:

- **greedy-token agreement, teacher-forced**: the emulated GPT is fed the float32 greedy codes and at each
  position its own greedy choice (argmax after the repetition penalty, as greedy decoding picks it) is
  compared with the float32 one. One early flip therefore costs one token, not the rest of the segment.
- **greedy-token agreement, free-running**: both generate on their own; the fraction of positions equal
  and the first position where they part (random demo weights make near-ties common).
- **mel and waveform SNR** of the teacher-forced run (identical codes and CFM noise, so the difference is
  the arithmetic alone): 10·log10(Σ ref² / Σ (ref − test)²) in dB, over the generated frames / samples.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from runtime.gpt.generate import FAKE_PROMPT_ID, GenerationConfig
from runtime.gpt.sampling import ProcessorSettings, process_scores_

from .fp16_emulation import emulated_model, fp16_nodes, node_views, policy_fp32, save_model

log = logging.getLogger(__name__)


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10·log10(Σ ref² / Σ (ref − test)²); +inf when identical, -inf/NaN-free for non-finite tests (-inf)."""
    ref = np.asarray(reference, np.float64).reshape(-1)
    out = np.asarray(test, np.float64).reshape(-1)
    n = min(ref.size, out.size)
    ref, out = ref[:n], out[:n]
    if not np.all(np.isfinite(out)):
        return -math.inf
    noise = float(np.sum((ref - out) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


class ForcedSteps:
    """GptSteps that record the wrapped GPT's greedy choice at every position and then force the given
    codes (all other logits set to -inf), so the loop follows the reference sequence. The cache and the
    lifetime are the wrapped steps' (`new_cache` and `close` delegate)."""

    def __init__(self, inner: Any, repetition_penalty: float) -> None:
        self._inner = inner
        self.geometry = inner.geometry
        self._settings = ProcessorSettings(repetition_penalty=repetition_penalty)
        self._forced: list[int] = []
        self._seen: list[int] = []
        self.choices: list[int] = []

    def start(self, codes: Sequence[int], stopped: bool) -> None:
        self._forced = [int(c) for c in codes] + ([self.geometry.stop_mel_token] if stopped else [])
        self._seen = [FAKE_PROMPT_ID, self.geometry.start_mel_token]
        self.choices = []

    def agreement(self) -> tuple[int, int]:
        """(positions where the greedy choice equals the forced code, positions compared)."""
        n = min(len(self.choices), len(self._forced))
        return sum(int(a == b) for a, b in zip(self.choices[:n], self._forced[:n])), n

    def prefill(self, feed: Mapping[str, np.ndarray]) -> dict:
        return self._force(self._inner.prefill(feed))

    def decode(self, feed: Mapping[str, np.ndarray]) -> dict:
        return self._force(self._inner.decode(feed))

    def new_cache(self, kv: Any, beams: int, max_rows: int, buckets: Sequence[int]) -> Any:
        return self._inner.new_cache(kv, beams, max_rows, buckets)

    def new_batch_cache(self, max_rows: int, buckets: Sequence[int]) -> None:
        """None: forcing follows one generation's steps, so forced generations are never batched."""
        return None

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _force(self, out: dict) -> dict:
        logits = out["logits"]
        vocab = logits.shape[-1]
        row = np.array(logits.reshape(-1, vocab)[:1], np.float32)
        seen = np.zeros((1, vocab), bool)
        seen[0, self._seen] = True
        process_scores_(row, seen, self._settings)
        self.choices.append(int(np.argmax(row[0])))
        pos = len(self.choices) - 1
        token = self._forced[pos] if pos < len(self._forced) else self.geometry.stop_mel_token
        self._seen.append(token)
        logits[...] = -np.inf
        logits[..., token] = 0.0
        return out


@dataclass
class ItemEffect:
    text: str
    lang: str
    reference: str
    tokens: int = 0
    forced_agree: int = 0
    free_agree: int = 0
    free_compared: int = 0
    first_divergence: int | None = None
    mel_snr_db: float = math.inf
    wav_snr_db: float = math.inf
    nonfinite: int = 0
    seconds: float = 0.0

    @property
    def forced_agreement(self) -> float:
        return self.forced_agree / self.tokens if self.tokens else 1.0

    @property
    def free_agreement(self) -> float:
        return self.free_agree / self.free_compared if self.free_compared else 1.0


@dataclass
class EffectSummary:
    label: str
    items: list[ItemEffect] = field(default_factory=list)

    @property
    def forced_agreement(self) -> float:
        n = sum(i.tokens for i in self.items)
        return sum(i.forced_agree for i in self.items) / n if n else 1.0

    @property
    def free_agreement(self) -> float:
        n = sum(i.free_compared for i in self.items)
        return sum(i.free_agree for i in self.items) / n if n else 1.0

    @property
    def min_mel_snr_db(self) -> float:
        return min((i.mel_snr_db for i in self.items), default=math.inf)

    @property
    def min_wav_snr_db(self) -> float:
        return min((i.wav_snr_db for i in self.items), default=math.inf)

    def to_json(self) -> dict[str, Any]:
        def num(x: float | None) -> Any:
            return None if x is None else (x if math.isfinite(x) else str(x))
        return {"label": self.label, "forced_agreement": self.forced_agreement,
                "free_agreement": self.free_agreement, "min_mel_snr_db": num(self.min_mel_snr_db),
                "min_wav_snr_db": num(self.min_wav_snr_db),
                "items": [{**{k: num(v) if isinstance(v, float) else v for k, v in vars(i).items()},
                           "forced_agreement": i.forced_agreement, "free_agreement": i.free_agreement}
                          for i in self.items]}


def write_emulated_graphs(export_dir: Path, out_dir: Path, policy: Any, graphs: Sequence[str] | None = None,
                          progress: Callable[[str], None] = lambda s: None) -> dict[str, int]:
    """Write every graph of `export_dir` as its FP16 emulation under `policy` into `out_dir/onnx/`.

    The fp32 layers are selected from the policy *file's* rules (engines.precision), exactly as the engine
    builder will select them, so this also checks the written policy reproduces the analysed islands.
    -> {graph: number of fp32 layers}."""
    import onnx

    from runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    counts = {}
    for name, entry in manifest.graphs.items():
        if graphs is not None and name not in graphs:
            continue
        progress(f"writing the fp16 emulation of {name}")
        model = onnx.load(str(entry.path(export_dir)))
        views = node_views(model)
        fp32 = policy_fp32(name, views, policy)
        emu = emulated_model(model, views, fp16_nodes(views, fp32))
        del model
        save_model(emu, entry.path(out_dir))
        counts[name] = len(fp32)
    return counts


def open_synthesizers(export_dir: Path, emulated_dir: Path, threads: int | None) -> tuple[Any, Any]:
    """(float32 synthesizer, emulated synthesizer) over the same manifest and assets."""
    from runtime.executors import OrtExecutor, OrtOptions
    from runtime.synthesizer import Synthesizer

    ref = Synthesizer(export_dir, "ort-cpu", ort_options=OrtOptions(intra_op_threads=threads))
    options = OrtOptions(intra_op_threads=threads, optimization="disable")     # fusions would drop roundings
    executors = {g: OrtExecutor(e, emulated_dir, "ort-cpu", options) for g, e in ref.manifest.graphs.items()}
    return ref, Synthesizer(export_dir, executors=executors)


def measure_effect(ref: Any, test: Any, items: Sequence[Mapping[str, str]], label: str, gpt_tokens: int,
                   seed: int = 0, free_running: bool = True,
                   progress: Callable[[str], None] = lambda s: None) -> EffectSummary:
    """The metrics of the module docstring for every item ({"text", "lang", "reference"})."""
    from runtime.request import SynthesisRequest

    greedy = greedy_config(ref.generation_defaults, gpt_tokens)
    summary = EffectSummary(label)
    forced = ForcedSteps(test.gpt_steps, greedy.repetition_penalty)
    plain_steps = test.gpt_steps
    for n, item in enumerate(items):
        t0 = time.perf_counter()
        request = SynthesisRequest(text=item["text"], speaker=Path(item["reference"]))
        effect = ItemEffect(item["text"], item.get("lang", ""), str(item["reference"]))
        ref_prep = ref.prepare(request, seed)
        test.gpt_steps = forced
        test_prep = test.prepare(request, seed)
        for i in range(len(ref_prep.segments)):
            r = ref.segment(ref_prep, i, greedy)
            forced.start(r.codes, r.stopped)
            t = test.segment(test_prep, i, greedy)
            agree, compared = forced.agreement()
            effect.tokens += compared
            effect.forced_agree += agree
            effect.nonfinite += int(np.size(t.mel) - np.count_nonzero(np.isfinite(t.mel)))
            effect.mel_snr_db = min(effect.mel_snr_db, snr_db(r.mel, t.mel))
            effect.wav_snr_db = min(effect.wav_snr_db, snr_db(r.pcm.astype(np.float64), t.pcm.astype(np.float64)))
        test.gpt_steps = plain_steps
        if free_running:
            free_prep = test.prepare(request, seed)
            ref_prep = ref.prepare(request, seed)
            offset = 0
            for i in range(len(ref_prep.segments)):
                r = ref.segment(ref_prep, i, greedy)
                t = test.segment(free_prep, i, greedy)
                a, b = list(r.codes) + ([-1] if r.stopped else []), list(t.codes) + ([-1] if t.stopped else [])
                same = [x == y for x, y in zip(a, b)]
                effect.free_agree += int(sum(same))
                effect.free_compared += max(len(a), len(b))
                if effect.first_divergence is None and (not all(same) or len(a) != len(b)):
                    effect.first_divergence = offset + (same.index(False) if False in same else min(len(a), len(b)))
                offset += len(a)
        effect.seconds = time.perf_counter() - t0
        summary.items.append(effect)
        progress(f"[{label}] item {n + 1}/{len(items)}: forced agreement {effect.forced_agreement:.3f}, "
                 f"free {effect.free_agreement:.3f}, mel SNR {effect.mel_snr_db:.1f} dB, "
                 f"wave SNR {effect.wav_snr_db:.1f} dB ({effect.seconds:.0f} s)")
    return summary


def pick_items(items: Sequence[Mapping[str, str]], count: int) -> list[Mapping[str, str]]:
    """`count` items spread over the set, preferring distinct texts (each text once before any repeats)."""
    by_text: dict[str, Mapping[str, str]] = {}
    for item in items:
        by_text.setdefault(item["text"], item)
    firsts = list(by_text.values())
    if count >= len(firsts):
        return firsts
    step = len(firsts) / count
    chosen = [firsts[int(i * step)] for i in range(count)]
    refs = sorted({str(i["reference"]) for i in items})
    # rotate the voices over the chosen texts so several references are covered too
    out = []
    for k, item in enumerate(chosen):
        ref = refs[k % len(refs)]
        match = next((i for i in items if i["text"] == item["text"] and str(i["reference"]) == ref), item)
        out.append(match)
    return out


def greedy_config(base: GenerationConfig, gpt_tokens: int) -> GenerationConfig:
    return replace(base, do_sample=False, num_beams=1, max_mel_tokens=gpt_tokens)
