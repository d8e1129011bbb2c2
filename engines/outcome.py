"""What became of each graph's engine in one build: a typed record instead of a message to search.

`EngineOutcome(graph, status, reason, plan)`: status "built" or "reused" (with the plan's path), "failed"
(with the reason: the error's type and message) or "skipped" (with the reason, e.g. no GPU here).
`EngineResults` holds one outcome per graph of a build, in manifest order, with the precision and the
TensorRT / GPU description, and answers the questions callers ask (which failed, which plans exist, is
everything usable) and writes the lines a CLI prints. `export.build` records it in its BuildReport;
`python -m calibration int8` reads it to know which graphs now have INT8 plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from runtime.errors import ContractError

Status = Literal["built", "reused", "failed", "skipped"]
STATUSES: tuple[Status, ...] = ("built", "reused", "failed", "skipped")


@dataclass(frozen=True)
class EngineOutcome:
    """One graph's engine. `plan` is set exactly when the status is built or reused; `reason` says why a
    graph failed or was skipped (and is empty otherwise)."""

    graph: str
    status: Status
    reason: str = ""
    plan: Path | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ContractError(f"engine outcome of '{self.graph}': status {self.status!r} is not one of "
                                f"{', '.join(STATUSES)}")
        has_plan = self.status in ("built", "reused")
        if has_plan != (self.plan is not None):
            raise ContractError(f"engine outcome of '{self.graph}': a {self.status} engine "
                                f"{'needs a' if has_plan else 'has no'} plan path")
        if not has_plan and not self.reason:
            raise ContractError(f"engine outcome of '{self.graph}': a {self.status} engine needs a reason")

    @property
    def ok(self) -> bool:
        """A plan is there to run."""
        return self.status in ("built", "reused")


@dataclass(frozen=True)
class EngineResults:
    """Every graph's outcome in one build (`precision`; `detail`: the TensorRT / GPU description, or why
    engines could not be built here)."""

    precision: str
    outcomes: tuple[EngineOutcome, ...]
    detail: str = ""

    @classmethod
    def all_skipped(cls, graphs: Iterable[str], precision: str, reason: str) -> "EngineResults":
        return cls(precision, tuple(EngineOutcome(g, "skipped", reason) for g in graphs), reason)

    @classmethod
    def all_failed(cls, graphs: Iterable[str], precision: str, reason: str) -> "EngineResults":
        return cls(precision, tuple(EngineOutcome(g, "failed", reason) for g in graphs), reason)

    def with_status(self, status: Status) -> list[EngineOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> dict[str, str]:
        """graph -> reason, for the graphs whose engine could not be built."""
        return {o.graph: o.reason for o in self.with_status("failed")}

    @property
    def plans(self) -> list[Path]:
        """The plans that are ready (built or reused), in build order."""
        return [o.plan for o in self.outcomes if o.plan is not None]

    @property
    def ok(self) -> bool:
        """Nothing failed (skipped graphs are not failures: engines are optional, DESIGN.md §5)."""
        return not self.failed

    def outcome(self, graph: str) -> EngineOutcome:
        for o in self.outcomes:
            if o.graph == graph:
                return o
        raise KeyError(f"no engine outcome for graph '{graph}' (have: {', '.join(o.graph for o in self.outcomes)})")

    def summary(self) -> str:
        """One line with the counts per status, then one line per failed graph."""
        counts = ", ".join(f"{len(self.with_status(s))} {s}" for s in STATUSES if self.with_status(s))
        if not self.outcomes:
            counts = "no graphs"
        skipped = self.with_status("skipped")
        if skipped and len(skipped) == len(self.outcomes) and len({o.reason for o in skipped}) == 1:
            return f"engines skipped: {skipped[0].reason}"
        head = f"engines ({self.precision}{', ' + self.detail if self.detail else ''}): {counts}"
        return "\n".join([head] + [f"  engine {o.graph} failed: {o.reason}" for o in self.with_status("failed")])
