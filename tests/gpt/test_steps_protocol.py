"""The GPT-steps seam is declared, not discovered: every implementation has every member of
runtime/gpt/steps.py:GptSteps (`geometry`, `prefill`, `decode`, `new_cache`, `new_batch_cache`, `close`), and the decode loop
gets its KV cache from `new_cache`, always.

Implementations are found by reading the repository's source (a class with one-feed `prefill` and
`decode` methods), so a new backend, wrapper or test fake that forgets a member fails here, not at the
first generation on a machine that has its backend.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest

from runtime.gpt.generate import GenerationConfig, generate
from runtime.gpt.graph_steps import GraphGptSteps
from runtime.gpt.kv_cache import KVCache
from runtime.gpt.steps import GptGeometry, GptSteps, KVCacheLike

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("runtime", "engines", "export", "calibration", "benchmarks", "serve", "tests")
#: the library's implementations (module, class); the discovery below must find at least these
LIBRARY = {("runtime.gpt.graph_steps", "GraphGptSteps"), ("runtime.trt.gpt_steps", "TrtGptSteps"),
           ("export.gpt_executor", "EagerGptSteps"), ("benchmarks.backends", "FixedLengthSteps"),
           ("calibration.effect", "ForcedSteps")}

METHODS = sorted(n for n, v in vars(GptSteps).items() if not n.startswith("_") and inspect.isfunction(v))
ATTRIBUTES = sorted(GptSteps.__annotations__)


def _params(fn: ast.FunctionDef) -> list[str]:
    return [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]


def _assigns_geometry(cls: ast.ClassDef) -> bool:
    """`geometry` as a class attribute (assignment or nested class) or set as `self.geometry` in a method."""
    for node in ast.walk(cls):
        if isinstance(node, ast.ClassDef) and node is not cls and node.name == "geometry":
            return True
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            for leaf in ast.walk(t):
                if isinstance(leaf, ast.Name) and leaf.id == "geometry":
                    return True
                if isinstance(leaf, ast.Attribute) and leaf.attr == "geometry" and \
                        isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                    return True
    return False


def _implementations() -> dict[tuple[str, str], ast.ClassDef]:
    """(module, class) -> class node, for every class whose `prefill` and `decode` each take one feed."""
    found: dict[tuple[str, str], ast.ClassDef] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ClassDef):
                    continue
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                if all(m in methods and len(_params(methods[m])) == 2 for m in ("prefill", "decode")):
                    found[(module, node.name)] = node
    return found


IMPLEMENTATIONS = _implementations()


def test_the_protocol_declares_every_member() -> None:
    assert METHODS == ["close", "decode", "new_batch_cache", "new_cache", "prefill"] and ATTRIBUTES == ["geometry"]


def test_discovery_finds_the_library_implementations_and_the_fakes() -> None:
    assert LIBRARY <= set(IMPLEMENTATIONS), LIBRARY - set(IMPLEMENTATIONS)
    assert len(IMPLEMENTATIONS) > len(LIBRARY)              # test fakes too
    assert not any(cls == "UnifiedVoice" for _, cls in IMPLEMENTATIONS)   # torch modules take tensors, not a feed


@pytest.mark.parametrize("where", sorted(IMPLEMENTATIONS), ids=lambda w: f"{w[0]}.{w[1]}")
def test_every_implementation_declares_every_member(where: tuple[str, str]) -> None:
    """Declared in the class body with the protocol's parameters (a `__getattr__` pass-through does not count)."""
    node = IMPLEMENTATIONS[where]
    methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
    for name in METHODS:
        assert name in methods, f"{where[0]}.{where[1]} does not declare {name}()"
        want = list(inspect.signature(getattr(GptSteps, name)).parameters)
        assert _params(methods[name]) == want, f"{where[0]}.{where[1]}.{name}: parameters differ from GptSteps"
    assert _assigns_geometry(node), f"{where[0]}.{where[1]} has no geometry"


@pytest.mark.parametrize("where", sorted(LIBRARY), ids=lambda w: f"{w[0]}.{w[1]}")
def test_library_implementations_have_every_member_when_imported(where: tuple[str, str]) -> None:
    cls = getattr(importlib.import_module(where[0]), where[1])
    for name in METHODS:
        member = inspect.getattr_static(cls, name)
        assert inspect.isfunction(member), f"{cls.__name__}.{name} is not a method"
        assert list(inspect.signature(member).parameters) == list(inspect.signature(getattr(GptSteps, name)).parameters)


# ---------------------------------------------------------------------------------------------------
# Behaviour: the loop takes the steps' cache; GraphGptSteps keeps a host cache and closes no executor

GEOMETRY = GptGeometry(layers=2, heads=2, head_dim=4, vocab_size=12, start_mel_token=10, stop_mel_token=11,
                       max_mel_tokens=50)


class FakeExecutor:
    """A GPT graph executor: prefill logits favour token 1 + row count; kv rows are their position."""

    def __init__(self, name: str) -> None:
        self.name, self.backend, self.calls, self.closed = name, "fake", 0, 0

    def run(self, feed, outputs=None):
        self.calls += 1
        g = GEOMETRY
        if self.name == "gpt_prefill":
            rows = feed["text_ids"].shape[1] + 2
            kv = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None],
                                 (g.layers, 2, 1, g.heads, rows, g.head_dim)).copy()
            logits = np.zeros((1, g.vocab_size), np.float32)
            logits[0, 1] = 1.0
            return {"logits": logits, "kv": kv}
        beams = feed["mel_ids"].shape[0]
        outputs["logits"][...] = 0.0
        outputs["logits"][np.arange(beams), (feed["mel_ids"][:, 0] + 1) % 10] = 1.0    # never the stop token
        outputs["kv_new"][...] = feed["mel_pos"][0, 0]
        return outputs

    def close(self) -> None:
        self.closed += 1


class SpySteps:
    """GraphGptSteps over fake executors, recording what the loop asks of `new_cache` and what it gets."""

    def __init__(self) -> None:
        self.inner = GraphGptSteps(FakeExecutor("gpt_prefill"), FakeExecutor("gpt_decode"), GEOMETRY)
        self.geometry = GEOMETRY
        self.asked: list[tuple] = []
        self.caches: list[KVCacheLike] = []

    def prefill(self, feed):
        self.last_kv = self.inner.prefill(feed)["kv"]
        return {"logits": np.zeros((1, GEOMETRY.vocab_size), np.float32), "kv": self.last_kv}

    def decode(self, feed):
        return self.inner.decode(feed)

    def new_cache(self, kv, beams, max_rows, buckets):
        self.asked.append((kv, beams, max_rows, tuple(buckets)))
        self.caches.append(self.inner.new_cache(kv, beams, max_rows, buckets))
        return self.caches[-1]

    def new_batch_cache(self, max_rows, buckets):
        return None

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("beams", [1, 3])
def test_the_loop_writes_into_the_cache_the_steps_made(beams: int) -> None:
    steps = SpySteps()
    config = GenerationConfig(do_sample=False, num_beams=beams, repetition_penalty=1.0, max_mel_tokens=9)
    result = generate(steps, {"spk_latent": np.zeros((1, 32, 4))}, np.zeros((1, 4)), np.arange(2, 7), config, cache_buckets=(8, 16))
    prompt = result.prompt_rows
    assert prompt == 5 + 2
    assert len(steps.asked) == 1
    kv, asked_beams, max_rows, buckets = steps.asked[0]
    assert kv is steps.last_kv and asked_beams == beams and max_rows == prompt + 9 - 1 and buckets == (8, 16)
    cache = steps.caches[0]
    assert isinstance(cache, KVCache) and isinstance(cache, KVCacheLike)
    decode_calls = steps.inner._decode.calls
    assert decode_calls == len(result.codes) - 1 > 0
    assert cache.length == prompt + decode_calls        # every decode step's rows went into this cache
    np.testing.assert_array_equal(cache.buffer[0, 0, 0, 0, :cache.length, 0],
                                  [*range(prompt), *range(2, 2 + decode_calls)])


def test_graph_steps_keep_a_host_cache_and_close_no_executor() -> None:
    prefill, decode = FakeExecutor("gpt_prefill"), FakeExecutor("gpt_decode")
    steps = GraphGptSteps(prefill, decode, GEOMETRY)
    assert isinstance(steps, GptSteps)
    kv = steps.prefill({"text_ids": np.zeros((1, 3), np.int64)})["kv"]
    cache = steps.new_cache(kv, 2, 20, (8, 32))
    assert isinstance(cache, KVCache) and cache.batch == 2 and cache.length == 5 and cache.capacity == 8
    np.testing.assert_array_equal(cache.buffer[:, :, 1, :, :5], kv[:, :, 0])
    feed = {**cache.feeds(), "mel_ids": np.zeros((2, 1), np.int64), "mel_pos": np.full((2, 1), 2, np.int64)}
    first = steps.decode(feed)
    steps.close()
    steps.close()
    assert prefill.closed == decode.closed == 0          # the executors are their owner's to close
    again = steps.decode(feed)                           # usable after close: the buffers come back
    assert again["logits"] is not first["logits"]
    np.testing.assert_array_equal(again["logits"], first["logits"])
