"""What every benchmark command prints and logs: the same logging set-up and the same progress lines.

Why one place: the benchmarks hold the GPT at a fixed length, so the runtime's "no stop token within
max_mel_tokens" warnings are expected noise there and are silenced the same way in every command.
"""

from __future__ import annotations

import logging
import time
from typing import Callable


def setup_logging(verbose: bool) -> None:
    """INFO with -v, else WARNING, without the fixed-length GPT's expected stop-token warnings."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:    # "no stop token within max_mel_tokens" is the point of a fixed length here
        for name in ("runtime.gpt.generate", "runtime.gpt.codes"):
            logging.getLogger(name).setLevel(logging.ERROR)


def progress_printer() -> Callable[[str], None]:
    """A function printing `[elapsed s] what` lines, elapsed since this call."""
    t0 = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {what}", flush=True)

    return progress
