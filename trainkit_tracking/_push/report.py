"""What ``push()`` reports: one entry per source run, totals and warnings, and the progress
callback it drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Progress = Callable[[int, int, int], None]
"""``progress(runs_done, runs_total, points_sent)``."""


@dataclass(frozen=True)
class PushedRun:
    """What push did (or, in a dry run, would do) with one source run."""

    source_run_id: str
    target_run_id: str | None
    experiment: str
    name: str
    target: str
    action: str  # "create", "update", "unchanged" or "skipped"
    points: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0


@dataclass
class PushReport:
    """The outcome of :func:`push`: one entry per source run, plus totals and warnings."""

    source: str
    store_id: str | None
    dry_run: bool
    runs: list[PushedRun] = field(default_factory=list)
    experiments_created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for run in self.runs if run.action == action)

    @property
    def created(self) -> int:
        return self.count("create")

    @property
    def updated(self) -> int:
        return self.count("update")

    @property
    def unchanged(self) -> int:
        return self.count("unchanged")

    @property
    def points(self) -> int:
        return sum(run.points for run in self.runs)

    @property
    def artifacts(self) -> int:
        return sum(run.artifacts for run in self.runs)

    @property
    def targets(self) -> list[str]:
        return sorted({run.target for run in self.runs})


class Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.progress = total, progress
        self.runs = self.points = 0

    def add(self, runs: int = 0, points: int = 0) -> None:
        self.runs += runs
        self.points += points
        if self.progress is not None:
            self.progress(self.runs, self.total, self.points)
