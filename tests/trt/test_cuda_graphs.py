"""runtime/trt/cuda_graphs.py: the plain -> capture -> replay policy, failures, LRU eviction."""

from __future__ import annotations

import itertools

import pytest

from runtime.errors import BackendError
from runtime.trt.cuda_graphs import GraphCache


class GraphLog:
    def __init__(self, fail_keys=()) -> None:
        self.events: list[tuple] = []
        self.fail_keys = set(fail_keys)
        self.ids = itertools.count()

    def capture(self, key):
        if key in self.fail_keys:
            self.events.append(("capture-failed", key))
            raise BackendError("execute_async_v3 returned False under stream capture")
        exec_ = (key, next(self.ids))
        self.events.append(("capture", key))
        return exec_

    def launch(self, exec_):
        self.events.append(("launch", exec_))

    def destroy(self, exec_):
        self.events.append(("destroy", exec_))

    def plain(self, key):
        return lambda: self.events.append(("plain", key))


def test_graph_policy_warm_up_capture_then_replay() -> None:
    g = GraphLog()
    cache = GraphCache(4, g.capture, g.launch, g.destroy)
    key = ("dit_step", 0, (("x", (1, 80, 10), 1234),))
    assert [cache.run(key, g.plain(key)) for _ in range(4)] == ["plain", "capture", "replay", "replay"]
    exec_ = (key, 0)
    assert g.events == [("plain", key), ("capture", key), ("launch", exec_), ("launch", exec_), ("launch", exec_)]
    assert (cache.stats.plain, cache.stats.captures, cache.stats.replays) == (1, 1, 2)
    other = ("dit_step", 0, (("x", (1, 80, 11), 1234),))
    assert cache.run(other, g.plain(other)) == "plain"         # a new shape warms up first
    assert cache.state(key) == "graph" and cache.state(other) == "warm"


def test_a_failed_capture_falls_back_to_plain_runs_for_good() -> None:
    bad = ("gpt_decode", 1, ())
    g = GraphLog(fail_keys=[bad])
    cache = GraphCache(4, g.capture, g.launch, g.destroy)
    assert [cache.run(bad, g.plain(bad)) for _ in range(5)] == ["plain"] * 5
    assert [e[0] for e in g.events] == ["plain", "capture-failed", "plain", "plain", "plain", "plain"]
    assert cache.stats.failed_captures == 1 and cache.stats.plain == 5 and len(cache) == 0
    assert cache.state(bad) == "uncapturable"
    assert cache.invalidate(("gpt_decode",)) == 0 and cache.state(bad) == "uncapturable"


def test_graph_eviction_is_lru_and_destroys() -> None:
    g = GraphLog()
    cache = GraphCache(2, g.capture, g.launch, g.destroy)
    keys = [("g", i, ()) for i in range(3)]
    for key in keys[:2]:
        cache.run(key, g.plain(key))
        cache.run(key, g.plain(key))
    cache.run(keys[0], g.plain(keys[0]))                       # key 0 is now the most recently used
    cache.run(keys[2], g.plain(keys[2]))
    cache.run(keys[2], g.plain(keys[2]))                       # third executable: evicts key 1
    assert ("destroy", (keys[1], 1)) in g.events
    assert keys[0] in cache and keys[2] in cache and keys[1] not in cache
    assert cache.stats.evictions == 1
    assert cache.run(keys[1], g.plain(keys[1])) == "plain"     # evicted: warm-up again
    assert cache.invalidate(("g", 0)) == 1 and keys[0] not in cache and cache.state(keys[0]) is None
    cache.clear()
    assert len(cache) == 0 and g.events[-1] == ("destroy", (keys[2], 2))
    with pytest.raises(ValueError):
        GraphCache(0, g.capture, g.launch, g.destroy)


