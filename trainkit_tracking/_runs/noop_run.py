"""The run of a DDP rank other than 0: Run's interface, nothing logged or created."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from trainkit_tracking._core.spec import RunKind, RunSpec
from trainkit_tracking._runs.handover import clean_env
from trainkit_tracking._runs.run import Run, RunOwner


class NoopRun(Run):
    """The run of a rank other than 0: same interface, logs nothing, creates nothing.

    Its ``id`` is rank 0's run id when a torch process group exists (broadcast), else
    None (typed ``str`` for the common case, so that code shared by all ranks type-checks).
    """

    def __init__(self, run_id: str | None, spec: RunSpec | None, tracker: RunOwner) -> None:
        self._tracker = tracker
        self._id = run_id  # type: ignore[assignment]
        self._name = ""
        self._spec = spec
        self._parent_id = None
        self._experiment_id = ""
        self._owns_status = False
        self._spec_problem = None
        self._holder = None
        self._ended = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"NoopRun(id={self._id!r})"

    def child(self, kind: RunKind | str, **spec_changes: Any) -> Run:
        spec = self._spec.child(kind, **spec_changes) if self._spec is not None else None
        return self._tracker._noop_collective(spec)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        return None

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        return None

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        return None

    def log_dict(self, obj: Any, file_name: str) -> None:
        return None

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def cv_summary(self) -> dict[str, float]:
        return {}

    def end(self, status: str = "FINISHED", *, timeout: float | None = None) -> bool:
        self._ended = True
        return self._tracker._release(self, timeout)  # its node's system metrics, if any

    def _end_nowait(self, status: str) -> bool:
        self._ended = True
        return False

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()

    def subprocess_env(
        self, base: Mapping[str, str] | None = None, *, child: RunSpec | None = None
    ) -> dict[str, str]:
        return clean_env(os.environ if base is None else base)
