"""Bounded, content-keyed caches for prepared references (speaker and emotion audio).

Upstream caches by path string (UPSTREAM §4.1); keyed by content here, so an edited file is never served
stale and two copies of one file share an entry. Thread-safe: a value is made at most once per key at a
time, and concurrent callers of the same key wait for it instead of computing it twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Generic, TypeVar

from runtime.errors import InputError
from runtime.frontend.audio import AudioBytes

T = TypeVar("T")


class LRU(Generic[T]):
    """At most `size` entries; the least recently used goes first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size = size
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self._making: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            maker = self._making.setdefault(key, threading.Lock())
        with maker:
            with self._lock:
                if key in self._items:           # made by another thread while we waited
                    self._items.move_to_end(key)
                    return self._items[key]
            value = make()
            with self._lock:
                self._items[key] = value
                self._making.pop(key, None)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return value


def audio_key(path: "str | Path | AudioBytes", role: str) -> str:
    """Cache key of a reference (a file or bytes in memory): its content hash (and the role it is used in)."""
    if isinstance(path, AudioBytes):
        return f"{role}:{hashlib.sha256(path.data).hexdigest()}"
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError as err:
        raise InputError(f"{path}: audio file not found") from err
    except IsADirectoryError as err:
        raise InputError(f"{path}: is a directory, not an audio file") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read the audio file ({err})") from err
    return f"{role}:{digest}"
