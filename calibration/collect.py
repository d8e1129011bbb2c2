"""`collect`: run the pipeline over the calibration set and keep the feeds every graph receives.

The eager pipeline by default (`--backend torch`: the PyTorch export wrappers under the runtime's own
orchestration, the same arrangement the parity tests use), so the feeds are what the reference model
really sends each graph boundary; `--backend ort-cpu` collects the same feeds faster (the graphs equal
the eager model to ~1e-5, export.verify).

What is kept per segment: every call of the speaker, emotion, latent, length-regulator and vocoder
graphs; of `gpt_decode` the calls listed in `decode_calls` (the cache grows with the position, so early,
middle and late positions); of `dit_step` the first, middle and last Euler step (t near 0, 0.5, 1: the
input goes from noise to mel). GPT generation is capped at `gpt_tokens` codes (random demo weights rarely
emit the stop token; real checkpoints stop earlier) and uses the export's sampling defaults with a seed.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from runtime.errors import InputError

from .corpus import CalibrationText
from .feeds import FeedStore

log = logging.getLogger(__name__)

COLLECT_BACKENDS = ("torch", "ort-cpu")


@dataclass(frozen=True)
class CollectSettings:
    backend: str = "torch"
    gpt_tokens: int = 48
    seed: int = 0
    decode_calls: tuple[int, ...] = (0, 5, 20, 46)
    euler_steps: int | None = None              # None: the export's default (25)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in COLLECT_BACKENDS:
            raise InputError(f"collect backend {self.backend!r}: one of {', '.join(COLLECT_BACKENDS)}")
        if self.gpt_tokens < 2:
            raise InputError(f"gpt_tokens must be >= 2 (one decode call at least), got {self.gpt_tokens}")


def keep_rule(graph: str, settings: CollectSettings, euler_steps: int) -> Callable[[int], bool]:
    """Which call indices (within one segment) of `graph` are kept."""
    if graph == "gpt_decode":
        wanted = set(settings.decode_calls)
        return lambda i: i in wanted
    if graph == "dit_step":
        steps = {0, euler_steps // 2, euler_steps - 1}
        return lambda i: i in steps
    return lambda i: True


@dataclass
class _Position:
    item: int = 0
    segment: int = 0


@dataclass
class CollectSummary:
    items: int
    segments: int
    feeds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _executors(export_dir: Path, checkpoints: Path | None, settings: CollectSettings) -> Any:
    from runtime.executors import GraphSet, OrtOptions
    from runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    if settings.backend == "torch":
        if checkpoints is None:
            raise InputError("collect --backend torch needs --checkpoints (the eager models are loaded from it)")
        import torch

        from export.eager import EagerModels
        from export.torch_executor import torch_executors

        if settings.threads:
            torch.set_num_threads(settings.threads)
        return torch_executors(EagerModels.load(checkpoints), manifest)
    graph_set = GraphSet(manifest, export_dir, settings.backend, OrtOptions(intra_op_threads=settings.threads))
    graph_set.open_all()
    return graph_set


def collect(export_dir: str | Path, out: str | Path, texts: Sequence[CalibrationText], references: Sequence[Path],
            settings: CollectSettings = CollectSettings(), checkpoints: str | Path | None = None,
            progress: Callable[[str], None] = lambda s: None) -> CollectSummary:
    """Synthesize every text with every reference voice and store the kept feeds in `out`."""
    from runtime.executors.recording import RecordingExecutor
    from runtime.request import DecoderSettings, SynthesisRequest
    from runtime.synthesizer import Synthesizer

    export_dir, out = Path(export_dir), Path(out)
    if not texts:
        raise InputError("calibration set: no texts")
    if not references:
        raise InputError("calibration set: no reference audio")
    for ref in references:
        if not Path(ref).is_file():
            raise InputError(f"reference audio {ref}: file not found")
    t0 = time.perf_counter()
    progress(f"loading the {settings.backend} models")
    inner = _executors(export_dir, Path(checkpoints) if checkpoints else None, settings)
    store = FeedStore(out)
    pos = _Position()
    from runtime.manifest import read_manifest

    steps = settings.euler_steps or read_manifest(export_dir).synthesis.euler_steps
    recorders = {g: RecordingExecutor(ex, keep_rule(g, settings, steps),
                                      (lambda graph: lambda call, feed: store.add(graph, feed, pos.item, pos.segment,
                                                                                  call))(g))
                 for g, ex in inner.items()}
    synth = Synthesizer(export_dir, executors=recorders)
    generation = replace(synth.generation_defaults, max_mel_tokens=settings.gpt_tokens)
    decoder = DecoderSettings(steps, synth.decoder_defaults.cfg_rate)
    manifest = synth.manifest
    store.meta = {"export": str(export_dir.resolve()), "version": manifest.version, "backend": settings.backend,
                  "settings": asdict(settings) | {"euler_steps": steps},
                  "generation": asdict(generation),
                  "graphs": {g: {"sha256": e.sha256, "fingerprint": e.fingerprint} for g, e in manifest.graphs.items()},
                  "dims": asdict(manifest.dims), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    pairs = list(itertools.product(range(len(texts)), range(len(references))))
    segments = 0
    for n, (ti, ri) in enumerate(pairs):
        text, ref = texts[ti], Path(references[ri])
        store.items.append({"text": text.text, "lang": text.lang, "reference": str(ref)})
        pos.item, pos.segment = n, 0
        for r in recorders.values():
            r.reset()
        request = SynthesisRequest(text=text.text, speaker=ref)
        t_item = time.perf_counter()
        for seg in synth.synthesize_segments(request, generation, decoder, seed=settings.seed + n):
            segments += 1
            pos.segment = seg.index + 1
            for r in recorders.values():
                r.reset()
            progress(f"[{n + 1}/{len(pairs)}] {text.lang} {len(text.text)} chars, {ref.name}: segment "
                     f"{seg.index + 1}/{seg.count}, {seg.codes.size} codes")
        log.info("item %d done in %.1f s", n, time.perf_counter() - t_item)
        store.save()                    # after every item: an interrupted run keeps what it collected
    store.save()
    summary = CollectSummary(len(pairs), segments, {g: len(gf.feeds) for g, gf in store.graphs.items()},
                             time.perf_counter() - t0)
    store.meta["summary"] = asdict(summary)
    store.save()
    return summary
