"""The run logger of SPEC section 7: validate at the call site, enqueue, never block.

A ``RunLogger`` checks every value where it is logged (the only errors that reach the
training loop) and appends it to its run's in-memory queue; the process's background
worker (``_sync.py``) spools, batches and sends it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import os
import posixpath
import re
import secrets
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainkit_tracking._redact import redact
from trainkit_tracking._spool import (
    BLOB_DIR,
    Point,
    Record,
    SpoolWriter,
    default_spool_dir,
    make_batches,
)
from trainkit_tracking._sync import Barrier, SyncReport, Worker, get_worker, pending, sync
from trainkit_tracking.errors import ParamConflictError, TrackingWarning

__all__ = ["RunLogger", "SyncReport", "default_spool_dir", "pending", "sync"]

MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_STEP = 2**63 - 1
STATUSES = ("FINISHED", "FAILED", "KILLED")
_KEY_RE = re.compile(r"^[/\w.\- :]*$")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Keys seen valid, so the hot path pays one set lookup; bounded for keys made per step.
_GOOD_KEYS: set[str] = set()
_LIVE: weakref.WeakSet[RunLogger] = weakref.WeakSet()
_UNWRITABLE: set[Path] = set()  # spool dirs already warned about
log = logging.getLogger(__name__)


# Validation --------------------------------------------------------------------


def _warn(message: str) -> None:
    """A TrackingWarning attributed to the first caller outside this package.

    In the worker's threads a warnings filter set to "error" must not lose data: the
    warning then becomes a log record.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    if frame is not None and frame.f_code.co_filename != threading.__file__:
        warnings.warn(message, TrackingWarning, stacklevel=level)
        return
    try:  # no caller outside the package: one of the worker's threads
        warnings.warn(message, TrackingWarning, stacklevel=2)
    except Exception:
        log.warning("%s", message)


def check_key(key: Any, what: str) -> str:
    """Return ``key`` if MLflow accepts it as a metric, param or tag key, else raise."""
    if not isinstance(key, str):
        raise TypeError(f"{what} key must be a str, got {key!r} ({type(key).__name__})")
    normal = posixpath.normpath(key) if key else "."
    if (
        len(key) > MAX_KEY
        or not _KEY_RE.match(key)
        or normal != key
        or normal == "."
        or normal.startswith(("..", "/"))
    ):
        raise ValueError(
            f"invalid {what} key {key!r}: keys are 1-{MAX_KEY} characters of letters, digits, "
            "'_', '-', '.', ' ', ':' and '/', with no leading '/', no '..' and no empty or '.' "
            "path parts; rename it"
        )
    if len(_GOOD_KEYS) < 100_000:
        _GOOD_KEYS.add(key)
    return key


def to_float(key: str, value: Any) -> float:
    """``float(value)`` for anything ``float()`` accepts except bools and text."""
    dtype = str(getattr(value, "dtype", ""))
    if not isinstance(value, (bool, str, bytes, bytearray)) and dtype not in ("bool", "torch.bool"):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            pass
    raise TypeError(
        f"metric {key!r}: value {value!r} ({type(value).__name__}) is not a number; log an "
        "int, a float or a numpy/torch scalar (NaN and inf are fine)"
    )


def check_step(step: Any) -> int:
    """Return ``step`` as an int >= 0, else raise ValueError."""
    if not isinstance(step, bool) and hasattr(type(step), "__index__"):
        value = operator.index(step)
        if 0 <= value <= MAX_STEP:
            return value
    raise ValueError(f"step must be an int >= 0, got {step!r}")


def flatten(params: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``; an empty nested mapping is kept as ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _cut(what: str, key: str, value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    _warn(
        f"{what} {key!r} is {len(value)} characters long; MLflow keeps at most {limit}, so it "
        f"is cut to {limit} (ending in '...'). Log long text with log_dict or log_artifact."
    )
    return value[: limit - 3] + "..."


def _artifact_dir(path: Any, what: str) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str):
        raise TypeError(f"{what} must be a str or None, got {path!r}")
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{what} {path!r} must be a relative path inside the run's artifacts")
    return path.replace("\\", "/").strip("/") or None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# The queue ---------------------------------------------------------------------
#
# A run's queue holds metric points as (key, value, timestamp_ms, step) tuples,
# ("p", params) and ("g", tags) pairs, artifact and end records (dicts, as spooled),
# and flush barriers.


class Channel:
    """The transport of one run in one process: call-site queue -> spool -> store."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        spool_dir: Path,
        *,
        flush_interval: float,
        heartbeat_interval: float,
        heartbeat_tag: str,
        heartbeat: bool,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = spool_dir
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_tag = heartbeat_tag
        self.heartbeat_on = heartbeat and heartbeat_interval > 0
        # The Tracker sets the first heartbeat when it creates the run.
        self.next_heartbeat = time.monotonic() + heartbeat_interval
        self.queue: deque[Any] = deque()
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.ended = False
        self.failed = 0  # records the store refused: kept in the spool for `sync`
        self.outstanding = 0  # records handed to the sender and not settled yet
        self.spool_ok = True
        self.writer: SpoolWriter | None = None
        self._seq = 0
        self.open_writer()

    def open_writer(self) -> None:
        try:
            self.writer = SpoolWriter(self.spool_dir, self.tracking_uri, self.run_id)
        except OSError as exc:
            self.spool_failed(exc)

    def spool_failed(self, exc: OSError) -> None:
        """Go on in memory only, with one warning per spool dir and process."""
        if self.spool_ok:
            self.spool_ok = False
            if self.spool_dir in _UNWRITABLE:
                log.debug("spool %s of run %s unwritable: %s", self.spool_dir, self.run_id, exc)
            else:
                _UNWRITABLE.add(self.spool_dir)
                _warn(
                    f"cannot write the tracking spool in {str(self.spool_dir)!r} ({exc}); "
                    "logging goes on in memory only, so what is unsent when the process dies "
                    "is lost. Set TRAINKIT_SPOOL_DIR to a writable directory."
                )
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close(delete=False)
            self.writer = None

    def collect(self) -> list[Record | Barrier]:
        """Drain the queue into numbered records (data, artifacts, end), then the barriers."""
        points: list[Point] = []
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        tail: list[Record] = []
        barriers: list[Record | Barrier] = []
        q = self.queue
        for _ in range(len(q)):
            item = q.popleft()
            if type(item) is tuple:
                if len(item) == 4:
                    points.append(item)
                else:
                    (params if item[0] == "p" else tags).update(item[1])
            elif type(item) is dict:
                tail.append(item)
            else:
                barriers.append(item)
        # The end goes last: a run is terminated after everything logged to it.
        records = make_batches(points, params, tags) + sorted(tail, key=lambda r: r["t"] == "e")
        for record in records:
            self._seq += 1
            record["n"] = self._seq
        return [*records, *barriers]


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
    ) -> None:
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval!r}")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = Path(spool_dir)
        self._flush_interval = float(flush_interval)
        self._heartbeat_interval = float(heartbeat_interval)
        self._heartbeat_tag = heartbeat_tag
        self._params: dict[str, str] = dict(known_params or {})
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
        )
        self._worker = get_worker()
        self._worker.register(channel)
        return channel

    def _slow_path(self) -> Channel:
        """After a fork (the child gets its own worker and spool) or after ``end``."""
        if self._forked:
            self._forked = False
            self._channel = self._new_channel(heartbeat=False)  # the parent keeps the beat
        if self._ended:
            if not self._warned_after_end:
                self._warned_after_end = True
                _warn(f"run {self.run_id} was ended; what is logged to it now is still sent")
            self._worker.register(self._channel)
        return self._channel

    def __repr__(self) -> str:
        return f"RunLogger(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"

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

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (nested mappings flattened with ``.``); a changed value is an error."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping, got {params!r}")
        prepared: dict[str, str] = {}
        for key, value in flatten(params).items():
            check_key(key, "param")
            text = "{}" if isinstance(value, Mapping) else str(value)
            prepared[key] = _cut("param", key, redact(key, text), MAX_PARAM_VALUE)
        with self._lock:
            for key, text in prepared.items():
                old = self._params.get(key)
                if old is not None and old != text:
                    raise ParamConflictError(
                        f"param {key!r} of run {self.run_id} is already {old!r}; it cannot "
                        f"become {text!r} (MLflow params never change). Log the new value "
                        "under another key, or as a metric or tag"
                    )
            new = {k: v for k, v in prepared.items() if self._params.get(k) != v}
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
            prepared[key] = _cut("tag", key, redact(key, text), MAX_TAG_VALUE)
        if prepared:
            channel = self._channel if not (self._forked or self._ended) else self._slow_path()
            channel.queue.append(("g", prepared))

    def log_artifact(
        self, local_path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Upload a file in the background; keep it in place until ``flush`` returns."""
        path = Path(local_path).absolute()
        if not path.is_file():
            problem = "is a directory (use log_artifacts)" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"artifact {str(local_path)!r} {problem}")
        self._enqueue_artifact(str(path), _artifact_dir(artifact_path, "artifact_path"))

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Upload a directory tree in the background; keep it in place until ``flush`` returns."""
        path = Path(local_dir).absolute()
        if not path.is_dir():
            raise FileNotFoundError(f"artifact directory {str(local_dir)!r} does not exist")
        self._enqueue_artifact(
            str(path), _artifact_dir(artifact_path, "artifact_path"), is_dir=True
        )

    def log_dict(self, obj: Any, file_name: str) -> None:
        """Save ``obj`` as JSON (``.json``) or YAML (``.yaml``/``.yml``) in the run's artifacts."""
        name = _artifact_dir(file_name, "file_name")
        if name is None or not name.lower().endswith((".json", ".yaml", ".yml")):
            raise ValueError(f"file_name {file_name!r} must end in .json, .yaml or .yml")
        folder, _, base = name.rpartition("/")
        try:
            if base.lower().endswith(".json"):
                text = json.dumps(obj, indent=2)
            else:
                import yaml

                text = yaml.safe_dump(obj, default_flow_style=False, sort_keys=False)
        except Exception as exc:  # json: TypeError/ValueError, yaml: RepresenterError
            raise TypeError(f"log_dict({file_name!r}): cannot serialise the object: {exc}") from exc
        # Written now, under the spool dir, so it survives until uploaded (also by `sync`).
        try:
            blob_dir = self.spool_dir / BLOB_DIR / secrets.token_hex(8)
            blob_dir.mkdir(parents=True, mode=0o700)
        except OSError:
            blob_dir = Path(tempfile.mkdtemp(prefix="trainkit-blob-"))
        blob = blob_dir / base
        blob.write_text(text, encoding="utf-8")
        self._enqueue_artifact(str(blob), folder or None, tmp=True)

    def _enqueue_artifact(
        self, src: str, dst: str | None, *, is_dir: bool = False, tmp: bool = False
    ) -> None:
        # tmp: a file the SDK wrote itself (log_dict), deleted once uploaded.
        record = {"t": "a", "src": src, "dst": dst, "dir": is_dir, "tmp": tmp}
        channel = self._channel if not (self._forked or self._ended) else self._slow_path()
        channel.queue.append(record)
        self._worker.kick()

    # Lifecycle -----------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far is stored; False on timeout or a refused record.

        Nothing is dropped on a timeout: the rest stays queued and spooled.
        """
        channel = self._channel if not self._forked else self._slow_path()
        barrier = Barrier()
        channel.queue.append(barrier)
        self._worker.register(channel)
        self._worker.kick()
        return barrier.event.wait(timeout) and barrier.ok

    def end(self, status: str | None = "FINISHED", timeout: float | None = None) -> bool:
        """Terminate the run with ``status`` after all its data, stop the heartbeat, flush.

        ``status=None`` (a joined run, ended by its owner) only flushes. The termination is
        spooled like the data, so `sync` finishes the run later if the store is down now.
        Idempotent: a second call only flushes.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)} or None, got {status!r}")
        channel = self._channel if not self._forked else self._slow_path()
        with self._lock:
            first, self._ended = not self._ended, True
        if first:
            channel.heartbeat_on = False
            if status is not None:
                channel.queue.append({"t": "e", "status": status, "end": _now_ms()})
            channel.ended = True
        return self.flush(timeout)


def _after_fork_in_child() -> None:
    # The child has no worker thread and must not write into the parent's spool file.
    for logger in list(_LIVE):
        logger._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
