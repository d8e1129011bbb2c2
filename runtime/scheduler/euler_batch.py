"""The Euler loop of many requests in shared `dit_step` calls.

Each row is one segment's flow solve, exactly runtime/cfm.py:euler_solve's (the same initial x, prompt
re-zeroing, t schedule and float32 `t += dt` accumulation), but the rows advance together: one call steps
every row of a group. Rows join whenever their codes are ready and leave when their own schedule ends,
each at its own t (the contract's `t` and `dt` are per row): continuous, not aligned, so a segment never
waits for others to start, and a long solve does not hold back a short one beyond sharing its calls.
Rows are padded to the group's longest; the exported dit_step computes each row as its batch-1 call would
(export/models/dit.py, `rows_alone`), so a row's mel is its mel alone. Rows share a call only when they
have the same `cfg_rate` (a scalar input of the graph).

Pure bookkeeping over an executor: no threads here (runtime/scheduler/workers.py drives it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from runtime.cfm import t_schedule
from runtime.executors.base import Executor


@dataclass
class EulerRow:
    """One solve's state between steps."""

    x: np.ndarray                 # (80, T) current x (prompt frames 0)
    prompt_x: np.ndarray          # (80, T) reference mel in the first P frames, 0 after
    cond: np.ndarray              # (T, C)
    style: np.ndarray             # (style_dim,)
    prompt_frames: int
    steps: int
    cfg_rate: float
    t: np.float32 = np.float32(0.0)
    done_steps: int = 0
    t_span: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def frames(self) -> int:
        return self.x.shape[1]


def start_row(cond: np.ndarray, prompt_mel: np.ndarray, style: np.ndarray, noise: np.ndarray, steps: int,
              cfg_rate: float) -> EulerRow:
    """A solve's first state, as euler_solve sets it up: cond (1, T, C), prompt_mel (1, 80, P), style (1, S),
    noise (1, 80, T)."""
    _, frames, _ = cond.shape
    prompt_frames = prompt_mel.shape[-1]
    if noise.shape != (1, prompt_mel.shape[1], frames):
        raise ValueError(f"noise {noise.shape} does not match the condition's {frames} frames")
    keep = (np.arange(frames) >= prompt_frames).astype(np.float32)
    x = np.ascontiguousarray((noise * keep)[0], np.float32)
    prompt_x = np.zeros_like(x)
    prompt_x[:, :prompt_frames] = prompt_mel[0]
    return EulerRow(x, prompt_x, np.ascontiguousarray(cond[0], np.float32),
                    np.ascontiguousarray(style, np.float32).reshape(-1), prompt_frames, steps, float(cfg_rate),
                    t_span=t_schedule(steps))


class EulerBatch:
    """Active solves; `step()` advances one group of rows (same cfg_rate) by one Euler step."""

    def __init__(self, dit_step: Executor, max_rows: int, pad_rows: bool = True) -> None:
        """`pad_rows`: rows of different lengths may share a call (the export's dit_step computes rows as
        alone); False (exports from before that): only rows of equal length share a call."""
        if max_rows < 1:
            raise ValueError(f"the Euler batch needs at least 1 row, got {max_rows}")
        self.dit_step, self.max_rows, self.pad_rows = dit_step, max_rows, pad_rows
        self.rows: dict[Hashable, EulerRow] = {}
        self.calls = 0
        self.peak_rows = 0                      # the most rows one call has stepped
        self.last_keys: list[Hashable] = []     # the rows of the last call (made or attempted)
        self._group: tuple | None = None        # (keys, feed, outputs) of the last group stepped
        self._turn = 0

    def __len__(self) -> int:
        return len(self.rows)

    def has_room(self) -> bool:
        return len(self.rows) < self.max_rows

    def join(self, key: Hashable, row: EulerRow) -> None:
        if key in self.rows:
            raise ValueError(f"Euler batch: {key!r} is already solving")
        self.rows[key] = row

    def leave(self, key: Hashable) -> None:
        self.rows.pop(key, None)

    def groups(self) -> list[list[Hashable]]:
        """Rows that can share a call: same cfg_rate (and same length unless rows may be padded), in
        joining order."""
        out: dict[tuple, list[Hashable]] = {}
        for key, row in self.rows.items():
            out.setdefault((row.cfg_rate, None if self.pad_rows else row.frames), []).append(key)
        return list(out.values())

    def step(self) -> dict[Hashable, np.ndarray]:
        """One dit_step call for one group (groups take turns); the solves that ended, with their mel
        (1, 80, T), prompt frames included (they have left the batch)."""
        groups = self.groups()
        if not groups:
            return {}
        keys = groups[self._turn % len(groups)]
        self._turn += 1
        rows = [self.rows[k] for k in keys]
        self.last_keys = list(keys)
        feed, out = self._feed_for(tuple(keys), rows)
        x_next = self.dit_step.run(feed, outputs=out)["x_next"]
        self.calls += 1
        self.peak_rows = max(self.peak_rows, len(rows))
        ended: dict[Hashable, np.ndarray] = {}
        for i, (key, row) in enumerate(zip(keys, rows)):
            dt = np.float32(row.t_span[row.done_steps + 1] - row.t_span[row.done_steps])
            np.copyto(row.x, x_next[i, :, :row.frames])                       # in place: the row owns its x
            row.t = np.float32(row.t + dt)
            row.done_steps += 1
            if row.done_steps == row.steps:
                ended[key] = row.x[None]
                self.leave(key)
        return ended

    def _feed_for(self, keys: tuple, rows: list[EulerRow]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The group's padded feed and output buffer, built once per membership; each step writes only the
        rows' x, t and dt into it (the condition, prompt and style stay), so a step allocates nothing."""
        if self._group is None or self._group[0] != keys:
            feed = _feed(rows)
            self._group = (keys, feed, {"x_next": np.empty_like(feed["x"])})
        _, feed, out = self._group
        for i, r in enumerate(rows):
            feed["x"][i, :, :r.frames] = r.x
            feed["t"][i] = r.t
            feed["dt"][i] = r.t_span[r.done_steps + 1] - r.t_span[r.done_steps]
        return feed, out


def _feed(rows: list[EulerRow]) -> dict[str, np.ndarray]:
    """The padded dit_step inputs of `rows` (zeros past each row's length)."""
    n, frames = len(rows), max(r.frames for r in rows)
    bins, content = rows[0].x.shape[0], rows[0].cond.shape[1]
    x = np.zeros((n, bins, frames), np.float32)
    prompt_x = np.zeros((n, bins, frames), np.float32)
    cond = np.zeros((n, frames, content), np.float32)
    for i, r in enumerate(rows):
        x[i, :, :r.frames] = r.x
        prompt_x[i, :, :r.frames] = r.prompt_x
        cond[i, :r.frames] = r.cond
    return {"x": x, "prompt_x": prompt_x, "x_lens": np.array([r.frames for r in rows], np.int64),
            "prompt_lens": np.array([r.prompt_frames for r in rows], np.int64),
            "t": np.array([r.t for r in rows], np.float32),
            "dt": np.array([r.t_span[r.done_steps + 1] - r.t_span[r.done_steps] for r in rows], np.float32),
            "style": np.stack([r.style for r in rows]), "cond": cond,
            "cfg_rate": np.array([rows[0].cfg_rate], np.float32)}
