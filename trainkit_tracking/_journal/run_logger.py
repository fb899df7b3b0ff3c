"""The run logger of SPEC section 7: validate at the call site, enqueue, never block.

A ``RunLogger`` checks every value where it is logged (the only errors that reach the
training loop) and queues it; the process's ``worker.py`` journals it and the store's
``sender.py`` sends it."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainkit_tracking._core.limits import GOOD_KEYS as _GOOD_KEYS
from trainkit_tracking._core.limits import MAX_KEY as MAX_KEY
from trainkit_tracking._core.limits import MAX_PARAM_VALUE as MAX_PARAM_VALUE
from trainkit_tracking._core.limits import (
    MAX_STEP,
    artifact_dir,
    check_step,
    flatten,
    storable,
    to_float,
)
from trainkit_tracking._core.limits import MAX_TAG_VALUE as MAX_TAG_VALUE
from trainkit_tracking._core.limits import check_key as check_key
from trainkit_tracking._core.limits import cut as _cut
from trainkit_tracking._core.redact import get_logger, redact, redact_value, warn
from trainkit_tracking._journal import capture
from trainkit_tracking._journal.channel import Barrier, Channel
from trainkit_tracking._journal.child_exit import flush_at_child_exit as _flush_at_child_exit
from trainkit_tracking._journal.spool import default_spool_dir, usable_spool_dir
from trainkit_tracking._journal.sync import SyncReport, pending, sync
from trainkit_tracking._journal.worker import Worker, get_worker
from trainkit_tracking._process import hooks
from trainkit_tracking.errors import ParamConflictError, TrackingError

__all__ = ["RunLogger", "SyncReport", "default_spool_dir", "pending", "sync", "warn"]

STATUSES = ("FINISHED", "FAILED", "KILLED")
_LIVE: weakref.WeakSet[RunLogger] = weakref.WeakSet()
# Points queued in memory before the spooler is woken (~1.5 MB), and the most the queue holds
# before a log call waits for the disk (~15 MB at ~150 B a point).
QUEUE_KICK = 10_000
QUEUE_MAX = 100_000
log = get_logger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# The logger --------------------------------------------------------------------


class RunLogger:
    """Buffered, spooled logging into one MLflow run; all sending happens in the background."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        spool_dir: Path,
        flush_interval: float = 1.0,
        known_params: Mapping[str, str] | None = None,
        heartbeat_interval: float = 30.0,
        heartbeat_tag: str = "code.heartbeat",
        timeout: float = 30.0,
        holder_tag: str | None = None,
        max_params: int | None = None,
    ) -> None:
        """``max_params``: the most params the store keeps per run (Azure ML: 200), known
        params included; the next one is refused at the call."""
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval!r}")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = usable_spool_dir(Path(spool_dir))
        self._flush_interval = float(flush_interval)
        self._heartbeat_interval = float(heartbeat_interval)
        self._heartbeat_tag = heartbeat_tag
        self._timeout = float(timeout)
        self._holder_tag = holder_tag
        self._params: dict[str, str] = dict(known_params or {})
        self._max_params = max_params
        self._lock = threading.Lock()
        self._ended = False
        self._warned_after_end = False
        self._forked = False
        self._worker: Worker
        self._channel = self._new_channel(heartbeat=True)
        _LIVE.add(self)

    def _new_channel(self, *, heartbeat: bool) -> Channel:
        channel = Channel(
            self.tracking_uri,
            self.run_id,
            self.spool_dir,
            flush_interval=self._flush_interval,
            heartbeat_interval=self._heartbeat_interval,
            heartbeat_tag=self._heartbeat_tag,
            heartbeat=heartbeat,
            timeout=self._timeout,
            holder_tag=self._holder_tag if heartbeat else None,
        )
        self._worker = get_worker()
        self._worker.register(channel)
        return channel

    def _slow_path(self) -> Channel:
        """After a fork (the child gets its own worker and spool) or after ``end``."""
        if self._forked:
            self._forked = False
            self._channel = self._new_channel(heartbeat=False)  # the parent keeps the beat
            _flush_at_child_exit(self)
        if self._ended:
            if not self._warned_after_end:
                self._warned_after_end = True
                warn(f"run {self.run_id} was ended; what is logged to it now is still sent")
            self._worker.register(self._channel)
        return self._channel

    @property
    def answered_since(self) -> float:
        """Wall time since which the store has answered this run's heartbeats throughout."""
        return self._channel.answered_since

    @property
    def store_down(self) -> bool:
        """Whether this run's store is known not to answer right now (the sender backs off,
        or an end already waited in vain): then ending does not read from it."""
        return self._worker.store_down(self._channel)

    def __repr__(self) -> str:
        return (
            f"RunLogger(run_id={self.run_id!r}, tracking_uri={redact_value(self.tracking_uri)!r})"
        )

    def _backlog(self, channel: Channel) -> None:
        """Many points logged since the last spooling: spool now, so that unsent points wait
        on disk; beyond ``QUEUE_MAX`` the call waits for the disk (memory stays bounded)."""
        self._worker.kick()
        deadline = time.monotonic() + self._timeout
        while len(channel.queue) > QUEUE_MAX and channel.spool_ok and time.monotonic() < deadline:
            time.sleep(0.001)

    # Logging -------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            step = 0
        elif type(step) is not int or not 0 <= step <= MAX_STEP:
            step = check_step(step)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a mapping of key -> number, got {metrics!r}")
        ts = time.time_ns() // 1_000_000
        good = _GOOD_KEYS
        points = []
        for key, value in metrics.items():
            if key not in good:
                check_key(key, "metric")
            if type(value) is not float:
                value = to_float(key, value)
            points.append((key, value, ts, step))
        channel = self._channel if not (self._forked or self._ended) else self._slow_path()
        channel.queue.extend(points)
        if len(channel.queue) > QUEUE_KICK:
            self._backlog(channel)

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings flattened with ``.``); a changed value is an error."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, got {params!r}")
        prepared: dict[str, str] = {}
        for key, value in flatten(params).items():
            check_key(key, "param")
            text = storable("param", key, "{}" if isinstance(value, Mapping) else str(value))
            prepared[key] = _cut("param", key, redact(key, text), MAX_PARAM_VALUE)
        with self._lock:
            for key, text in prepared.items():
                old = self._params.get(key)
                if old is not None and old != text:
                    raise ParamConflictError(
                        f"param {key!r} of run {self.run_id} is already {old!r}; it cannot "
                        f"become {text!r} (MLflow params never change). Log the new value "
                        "under another key, or as a metric or tag",
                        key=key,
                        old=old,
                        new=text,
                        run_id=self.run_id,
                    )
            new = {k: v for k, v in prepared.items() if self._params.get(k) != v}
            if self._max_params is not None and len(self._params) + len(new) > self._max_params:
                _too_many_params(self.run_id, new, len(self._params), self._max_params)
            self._params.update(new)
        if new:
            channel = self._channel if not (self._forked or self._ended) else self._slow_path()
            channel.queue.append(("p", new))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a mapping, got {tags!r}")
        prepared: dict[str, str] = {}
        for key, value in tags.items():
            check_key(key, "tag")
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            text = storable("tag", key, text)
            prepared[key] = _cut("tag", key, redact(key, text), MAX_TAG_VALUE)
        if prepared:
            channel = self._channel if not (self._forked or self._ended) else self._slow_path()
            channel.queue.append(("g", prepared))

    def log_artifact(
        self, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Upload a file in the background, as it is now: it is captured into the journal
        before this returns, so it may be deleted or rewritten right after."""
        path = Path(local_path).absolute()
        if not path.is_file():
            problem = "is a directory (use log_artifacts)" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"artifact {str(local_path)!r} {problem}")
        dst = artifact_dir(artifact_path, "artifact_path")
        try:
            captured = capture.capture_file(self.spool_dir, path)
        except OSError as exc:
            raise OSError(f"artifact {str(local_path)!r} cannot be read: {exc}") from exc
        self._enqueue_artifact(str(captured), dst, name=path.name)

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Upload a directory tree in the background, as it is now (captured before this
        returns)."""
        path = Path(local_dir).absolute()
        if not path.is_dir():
            raise FileNotFoundError(f"artifact directory {str(local_dir)!r} does not exist")
        dst = artifact_dir(artifact_path, "artifact_path")
        try:
            captured = capture.capture_tree(self.spool_dir, path)
        except (OSError, shutil.Error) as exc:
            raise OSError(f"artifact directory {str(local_dir)!r} cannot be read: {exc}") from exc
        self._enqueue_artifact(str(captured), dst, name=path.name, is_dir=True)

    def log_dict(self, obj: Any, file_name: str) -> None:
        """Save ``obj`` as JSON (``.json``) or YAML (``.yaml``/``.yml``) in the run's artifacts.

        Values of secret-looking keys (``hf_token``, ``password``...) are masked, as in
        ``log_params``."""
        name = artifact_dir(file_name, "file_name")
        if name is None or not name.lower().endswith((".json", ".yaml", ".yml")):
            raise ValueError(f"file_name {file_name!r} must end in .json, .yaml or .yml")
        folder, _, base = name.rpartition("/")
        obj = capture.masked(obj)
        try:
            if base.lower().endswith(".json"):
                text = json.dumps(obj, indent=2)
            else:
                import yaml

                text = yaml.safe_dump(obj, default_flow_style=False, sort_keys=False)
        except Exception as exc:  # json: TypeError/ValueError, yaml: RepresenterError
            raise TypeError(f"log_dict({file_name!r}): cannot serialise the object: {exc}") from exc
        self._write_artifact(text, folder or None, base)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save ``text`` as the file ``artifact_file`` (e.g. ``"notes/readme.md"``) in the
        run's artifacts; credentials in it (URL passwords, tokens) are masked."""
        if not isinstance(text, str):
            raise TypeError(f"log_text needs a str, got {type(text).__name__}")
        name = artifact_dir(artifact_file, "artifact_file")
        if name is None:
            raise ValueError(f"artifact_file {artifact_file!r} must name a file")
        folder, _, base = name.rpartition("/")
        self._write_artifact(redact_value(text), folder or None, base)

    def _write_artifact(self, text: str, folder: str | None, base: str) -> None:
        try:
            blob = capture.write_text(self.spool_dir, base, text)
        except OSError as exc:
            raise OSError(f"cannot write {base!r} for run {self.run_id}: {exc}") from exc
        self._enqueue_artifact(str(blob), folder, name=base)

    def _enqueue_artifact(
        self, src: str, dst: str | None, *, name: str, is_dir: bool = False
    ) -> None:
        # tmp: what the journal captured, deleted once uploaded (kept while set aside).
        record = {"t": "a", "src": src, "dst": dst, "dir": is_dir, "tmp": True, "name": name}
        channel = self._channel if not (self._forked or self._ended) else self._slow_path()
        channel.queue.append(record)
        self._worker.kick()

    # Lifecycle -----------------------------------------------------------------

    def flush(
        self,
        timeout: float | None = None,
        *,
        ending: bool = False,
        spooled_only: bool = False,
        covers: bool = True,
    ) -> bool:
        """Wait until everything logged so far is stored; False on timeout, or when something
        logged since the last flush was set aside (that flush alone says so).

        Nothing is dropped on a timeout: the rest stays in the journal. ``covers=False``:
        the SDK's own wait (a leaderboard before the end), which leaves it to the next
        flush to report what was set aside.
        """
        channel = self._channel if not self._forked else self._slow_path()
        barrier = Barrier(covers=covers)
        channel.queue.append(barrier)
        self._worker.register(channel)
        self._worker.kick()
        if spooled_only:  # on disk (or in memory, when the spool is not writable) is enough
            return barrier.spooled.wait(timeout)
        return self._worker.wait(channel, barrier, timeout, ending=ending)

    def end(self, status: str | None = "FINISHED", timeout: float | None = None) -> bool:
        """Terminate the run with ``status`` after all its data, stop the heartbeat, flush.

        ``status=None`` (a joined run, ended by its owner) only flushes. The termination is
        spooled like the data, so `sync` finishes the run later if the store is down now.
        Idempotent: a second call only flushes.
        """
        self.end_nowait(status)
        return self.flush(timeout, ending=True)

    def end_nowait(
        self, status: str | None, *, override: bool = False, tags: Mapping[str, str] | None = None
    ) -> None:
        """Queue the termination (after everything logged so far) without waiting.

        ``override``: the run was already ended, but the process is dying of an interrupt
        while it waited: a second end record with this status goes after the first.
        ``tags`` (e.g. ``code.interrupted``) are sent just before the end.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)} or None, got {status!r}")
        channel = self._channel if not self._forked else self._slow_path()
        with self._lock:
            first, self._ended = not self._ended, True
        if first or override:
            channel.heartbeat_on = False
            if tags:
                channel.queue.append(("g", dict(tags)))
            if status is not None:
                channel.queue.append({"t": "e", "status": status, "end": _now_ms()})
            channel.ended = True
            self._worker.register(channel)
            self._worker.kick()


def _too_many_params(run_id: str, new: Mapping[str, str], held: int, limit: int) -> None:
    index = max(0, limit - held)
    key = list(new)[index]
    raise TrackingError(
        f"param {key!r} would be param {held + index + 1} of run {run_id}, and the store keeps "
        f"at most {limit} params per run (Azure ML's limit); nothing of this call was logged. "
        "Log fewer params (the rest as an artifact with run.log_dict, or as tags)"
    )


def _after_fork_in_child() -> None:
    # The child has no worker thread and must not write into the parent's spool file.
    for logger in list(_LIVE):
        logger._forked = True


hooks.on_fork(_after_fork_in_child)
