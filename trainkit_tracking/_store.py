"""The only module that talks to MLflow: a thin MlflowClient wrapper with explicit run ids.

Every call goes through one door (``Store._call``): a deadline, retries of transient
errors, a fast TCP check for http(s) stores, and errors classified once: transient (retry)
or permanent (refused: never retried). mlflow is imported lazily, on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from trainkit_tracking import _timeout
from trainkit_tracking._redact import get_logger, redact_value
from trainkit_tracking.errors import StoreUnavailableError, TrackingError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = get_logger(__name__)

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
CLAIM_PREFIX = ".trainkit-claims"
DEFAULT_TIMEOUT = 30.0
# A refused connection is retried this long (a server restarting), then reported.
REFUSED_GRACE = 3.0
# Uploads (checkpoints) take longer than control calls; they run in the background only.
ARTIFACT_TIMEOUT = 900.0
# Creating a fresh sqlite schema takes ~6 s; processes queue for it behind a lock.
SQLITE_INIT_TIMEOUT = 300.0
_TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_TRANSIENT_TEXT = (
    "database is locked",
    "connection",
    "timed out",
    "timeout",
    "temporarily",
    "max retries",
    "too many requests",
    "service unavailable",
    "bad gateway",
)
# Azure's SDK errors that mean "the network or service did not answer" (azure.core.exceptions).
_AZURE_TRANSIENT = frozenset(
    {"ServiceRequestError", "ServiceResponseError", "ServiceRequestTimeoutError"}
)


@dataclass(frozen=True)
class RunRecord:
    """What the SDK reads back about one run."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int | None
    end_time: int | None
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def parent_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


@dataclass(frozen=True)
class ExperimentRecord:
    experiment_id: str
    name: str
    deleted: bool


def error_code(exc: BaseException) -> str | None:
    """The MLflow error code of ``exc`` (e.g. ``RESOURCE_ALREADY_EXISTS``), if it has one."""
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised ``exc`` may succeed (store busy, down or slow).

    Everything else is a permanent refusal (a bad or conflicting value, a missing run, a
    value the database cannot encode): retrying it would block what comes after it.
    """
    if isinstance(exc, StoreUnavailableError):
        return True
    if isinstance(exc, (UnicodeError, ValueError, TypeError)) and error_code(exc) is None:
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    if {cls.__name__ for cls in type(exc).__mro__} & _AZURE_TRANSIENT:
        return True
    code = error_code(exc)
    if code in _TRANSIENT_CODES:
        return True
    if code is not None and code != "INTERNAL_ERROR":
        return False
    # INTERNAL_ERROR (or no code): a database that is locked or gone is worth a retry; a
    # value it cannot encode ("surrogates not allowed") is not.
    text = str(exc).lower()
    return any(fragment in text for fragment in _TRANSIENT_TEXT)


def is_already_exists(exc: BaseException) -> bool:
    return error_code(exc) == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc)


def claim_experiment_name(experiment_id: str, base_name: str, version: int) -> str:
    """The hidden experiment name whose creation claims ``version`` of ``base_name``."""
    digest = hashlib.sha256(base_name.encode("utf-8")).hexdigest()[:32]
    return f"{CLAIM_PREFIX}/{experiment_id}/{digest}/{version}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other schemes and in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _http_address(uri: str) -> tuple[str, int] | None:
    """(host, port) to probe for an http(s) store reached directly (not through a proxy)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    import urllib.request  # deferred: it imports http.client, and imports must stay cheap

    proxies = urllib.request.getproxies()
    if proxies.get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return None  # the proxy is what answers; MLflow's own call will tell
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def probe(uri: str, timeout: float) -> None:
    """Open a TCP connection to an http(s) store; raises OSError when nothing listens."""
    address = _http_address(uri)
    if address is not None:
        with socket.create_connection(address, timeout=max(timeout, 0.01)):
            pass


@contextlib.contextmanager
def _sqlite_init_lock(db: Path, deadline: float) -> Iterator[None]:
    """Serialise the first opening (schema creation and migrations) of a sqlite store.

    MLflow creates and migrates the schema when it opens the database; two processes doing
    it at once corrupt a fresh file for good (``table _alembic_tmp_tags already exists``).
    The lock file sits beside the database; the kernel releases it if its holder dies.
    """
    from trainkit_tracking._spool import try_lock

    try:
        fd = os.open(db.with_name(db.name + ".trainkit-lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # no such or a read-only directory: MLflow will say so itself
        log.debug("no lock beside %s (%s); opening it unlocked", db, exc)
        yield
        return
    try:
        while not try_lock(fd):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"another process holds {db}.trainkit-lock")
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


class Store:
    """MlflowClient with explicit run ids; every call bounded, retried and classified."""

    def __init__(
        self, tracking_uri: str, *, timeout: float = DEFAULT_TIMEOUT, retries: bool = True
    ) -> None:
        """``timeout``: the most any call waits in total, retries included. ``retries=False``
        (the logging sender, which has its own backoff) makes one bounded try per call."""
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.tracking_uri = tracking_uri
        self.timeout = float(timeout)
        self.retries = retries
        self.shown_uri = redact_value(tracking_uri)
        self._client: MlflowClient | None = None
        self._client_lock = threading.Lock()
        self._reachable = _http_address(tracking_uri) is None  # only http(s) stores are probed

    def __repr__(self) -> str:
        return f"Store({self.shown_uri!r})"

    def _unavailable(self, what: str, waited: float, reason: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the tracking store {self.shown_uri} did not answer {what} within {waited:.1f} s "
            f"({redact_value(reason)}); check that it is running and reachable (`trainkit-"
            "tracking doctor` tells), or raise Tracker(timeout=...) / TRAINKIT_TIMEOUT",
            uri=self.shown_uri,
            operation=what,
            waited=round(waited, 3),
        )

    def _probe(self, what: str, started: float, deadline: float) -> None:
        """Fail fast where nothing listens: a refused port or an unknown host."""
        if _http_address(self.tracking_uri) is None:
            return
        refused_since: float | None = None
        delay = 0.1
        while True:
            remaining = deadline - time.monotonic()
            try:
                probe(self.tracking_uri, min(remaining, 5.0))
                self._reachable = True
                return
            except socket.gaierror as exc:  # unknown host: waiting will not help
                raise self._unavailable(what, time.monotonic() - started, str(exc)) from exc
            except OSError as exc:
                now = time.monotonic()
                if isinstance(exc, ConnectionRefusedError):
                    refused_since = now if refused_since is None else refused_since
                    if now - refused_since >= REFUSED_GRACE:
                        raise self._unavailable(what, now - started, "connection refused") from exc
                if now + delay >= deadline:
                    raise self._unavailable(
                        what, now - started, str(exc) or type(exc).__name__
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _call(self, call: Callable[[], T], *, what: str, timeout: float | None = None) -> T:
        """The one door to MLflow: ``call`` bounded by the deadline, transient errors retried.

        MLflow's own HTTP retries run inside the bounded call, so they end at the deadline
        too. A permanent error is raised at once, as MLflow raised it.
        """
        client = self.client  # opened outside the deadline (see the property)
        assert client is not None
        started = time.monotonic()
        deadline = started + (self.timeout if timeout is None else timeout)
        delay = 0.05
        while True:
            # The background sender (retries=False) checks before every call: MLflow's own
            # retries of a refused connection would otherwise hold it for the whole bound.
            if not self._reachable or not self.retries:
                self._probe(what, started, deadline)
            remaining = deadline - time.monotonic()
            try:
                return _timeout.bounded(call, timeout=remaining, what=what)
            except _timeout.Abandoned as exc:
                self._reachable = _http_address(self.tracking_uri) is None
                raise self._unavailable(what, time.monotonic() - started, "no answer") from exc
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._reachable = _http_address(self.tracking_uri) is None
                waited = time.monotonic() - started
                if not self.retries or time.monotonic() + delay >= deadline:
                    raise self._unavailable(what, waited, str(exc)) from exc
                log.debug("retrying %s after a transient error: %s", what, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @property
    def client(self) -> MlflowClient:
        """The MlflowClient, opened once; a sqlite store is opened under a lock file.

        Opening imports mlflow (seconds on a loaded machine) and, for sqlite, checks or
        creates the schema: it happens before a call's deadline starts, since it does not
        wait on the network (MlflowClient does not contact an http store until called).
        """
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    from mlflow.tracking import MlflowClient

                    db = sqlite_path(self.tracking_uri)
                    if db is None:
                        self._client = MlflowClient(tracking_uri=self.tracking_uri)
                    else:
                        # MlflowClient() opens the store, which creates/migrates the schema.
                        deadline = time.monotonic() + max(self.timeout, SQLITE_INIT_TIMEOUT)
                        with _sqlite_init_lock(db, deadline):
                            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def is_local(self) -> bool:
        """Whether the store is a file on this machine (sqlite, or MLflow's file store)."""
        return self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri

    # Experiments -------------------------------------------------------------

    def get_or_create_experiment(self, name: str) -> str:
        """Return the id of experiment ``name``, creating it; safe when processes race."""
        for _ in range(5):
            experiment = self._call(
                lambda: self.client.get_experiment_by_name(name), what="get_experiment_by_name"
            )
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"experiment {name!r} exists but is deleted; restore it in the MLflow UI "
                        "or with `mlflow experiments restore`, or use another experiment name"
                    )
                return str(experiment.experiment_id)
            try:
                return str(
                    self._call(
                        lambda: self.client.create_experiment(name), what="create_experiment"
                    )
                )
            except Exception as exc:
                if not is_already_exists(exc):
                    raise
                # Another process created it between our lookup and our create: look again.
        raise TrackingError(f"could not get or create experiment {name!r}")

    def find_experiment(self, name_or_id: str) -> ExperimentRecord | None:
        """The experiment named ``name_or_id`` (else with that id), deleted ones included;
        None when there is none. Failures to ask (network, auth) raise, never None."""
        found = self._call(
            lambda: self.client.get_experiment_by_name(name_or_id), what="get_experiment_by_name"
        )
        if found is None and name_or_id.isdigit():
            try:
                found = self._call(
                    lambda: self.client.get_experiment(name_or_id), what="get_experiment"
                )
            except Exception as exc:
                if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        if found is None:
            return None
        return ExperimentRecord(
            str(found.experiment_id), str(found.name), found.lifecycle_stage == "deleted"
        )

    def ping(self) -> None:
        """One cheap read: raises when the store does not answer."""
        self._call(lambda: self.client.search_experiments(max_results=1), what="a first read")

    def list_experiments(self) -> list[ExperimentRecord]:
        """Every active experiment of the store (all pages)."""
        return [
            ExperimentRecord(str(e.experiment_id), str(e.name), False)
            for e in self._experiment_pages()
        ]

    def _experiment_pages(self) -> Iterator[Any]:
        """MLflow's active experiments, page after page."""
        token: str | None = None
        while True:
            page = self._call(
                lambda token=token: self.client.search_experiments(  # type: ignore[misc]
                    max_results=1000, page_token=token
                ),
                what="search_experiments",
            )
            yield from page
            token = page.token
            if not token:
                return

    def experiment_name(self, experiment_id: str) -> str:
        experiment = self._call(
            lambda: self.client.get_experiment(experiment_id), what="get_experiment"
        )
        return str(experiment.name)

    def claim_version(self, experiment_id: str, base_name: str, start: int = 1) -> int:
        """Claim the first free version >= ``start`` of ``base_name`` in the experiment.

        A claim is the creation of a hidden experiment with a name unique to
        (experiment, base name, version): experiment names are unique in every MLflow
        backend, so exactly one creator wins each version, whatever the number of
        processes or machines. The claim is then soft-deleted in the background (hidden
        from the UI; its name stays reserved). Claims are never released, so the taken
        versions form a prefix: when ``start`` is taken, reads gallop to the end of it.
        """
        version = max(1, start)
        while True:
            name = claim_experiment_name(experiment_id, base_name, version)
            try:
                claim_id = self._call(
                    lambda n=name: self.client.create_experiment(n),  # type: ignore[misc]
                    what="claim version",
                )
            except Exception as exc:
                if is_already_exists(exc):
                    version = self._first_free(experiment_id, base_name, version + 1)
                    continue
                raise
            _hide_later(self, str(claim_id))
            return version

    def try_claim(self, experiment_id: str, what: str, number: int) -> bool:
        """Claim ``number`` of ``what`` in the experiment: True for exactly one caller.

        The primitive of the version claims (a hidden experiment whose name is unique),
        used for race-free get-or-create: every caller that saw the same state claims the
        same number, and only the one whose creation succeeded goes on to create.
        """
        name = claim_experiment_name(experiment_id, what, number)
        try:
            claim_id = self._call(lambda: self.client.create_experiment(name), what="claim")
        except Exception as exc:
            if is_already_exists(exc):
                return False
            raise
        _hide_later(self, str(claim_id))
        return True

    def delete_tag(self, run_id: str, key: str) -> None:
        def call() -> None:
            try:
                self.client.delete_tag(run_id, key)
            except Exception as exc:  # already gone: what we wanted
                if error_code(exc) != "RESOURCE_DOES_NOT_EXIST" and "No tag" not in str(exc):
                    raise

        self._call(call, what="delete_tag")

    def claims_intact(self, experiment_id: str, version_tag: str) -> bool:
        """Whether every version claim of the experiment is still in the store.

        ``mlflow gc`` purges soft-deleted experiments, claims included. A sentinel claim,
        made before the first version of the experiment was claimed, tells: when it is
        gone but runs carry a version tag, claims were purged and the numbers of live
        runs must be checked. One read per experiment and process.
        """
        name = f"{CLAIM_PREFIX}/{experiment_id}/sentinel"
        try:
            sentinel = self._call(lambda: self.client.create_experiment(name), what="claim")
        except Exception as exc:
            if is_already_exists(exc):
                return True  # made earlier (by us or a racing process): claims intact
            raise
        _hide_later(self, str(sentinel))
        # We made the sentinel: versioned runs that already exist mean claims were purged.
        versioned = self.search(
            [experiment_id], f"tags.`{version_tag}` LIKE '%'", max_results=1, include_deleted=True
        )
        return not versioned

    def _claimed(self, experiment_id: str, base_name: str, version: int) -> bool:
        name = claim_experiment_name(experiment_id, base_name, version)
        found = self._call(lambda: self.client.get_experiment_by_name(name), what="read claim")
        return found is not None

    def _first_free(self, experiment_id: str, base_name: str, low: int) -> int:
        """The lowest version >= ``low`` not claimed yet, in O(log n) reads."""
        if not self._claimed(experiment_id, base_name, low):
            return low
        step = 1
        taken, high = low, low + 1
        while self._claimed(experiment_id, base_name, high):
            taken, step = high, step * 2
            high = taken + step
        while high - taken > 1:
            middle = (taken + high) // 2
            if self._claimed(experiment_id, base_name, middle):
                taken = middle
            else:
                high = middle
        return high

    def hide_claim(self, claim_id: str) -> None:
        try:
            self._call(lambda: self.client.delete_experiment(claim_id), what="hide claim")
        except Exception as exc:  # a visible claim is cosmetic, never fatal
            log.debug("could not hide version claim %s: %s", claim_id, exc)

    # Runs --------------------------------------------------------------------

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> RunRecord:
        run = self._call(
            lambda: self.client.create_run(experiment_id, tags=dict(tags), run_name=run_name),
            what="create_run",
        )
        return _record(run)

    def rename_run(self, run_id: str, name: str) -> None:
        self._call(lambda: self.client.update_run(run_id, name=name), what="update_run")

    def set_status(self, run_id: str, status: str) -> None:
        self._call(lambda: self.client.update_run(run_id, status=status), what="update_run")

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        from mlflow.entities import RunStatus

        end = end_time or int(time.time() * 1000)

        def call() -> None:
            # MlflowClient.set_terminated() fetches the run again and writes "View run ..."
            # lines to stdout for http stores (mlflow/tracking/_tracking_service/client.py,
            # _log_url): a library must not print into its user's training logs, so go to
            # the store directly when the client exposes it.
            store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
            if store is None or not hasattr(store, "update_run_info"):
                self.client.set_terminated(run_id, status=status, end_time=end)
            else:
                store.update_run_info(
                    run_id, run_status=RunStatus.from_string(status), end_time=end, run_name=None
                )

        self._call(call, what="end run")

    def get_run(self, run_id: str) -> RunRecord:
        return _record(self._call(lambda: self.client.get_run(run_id), what="get_run"))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.log_batch(run_id, tags=tags)

    def search(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = ("attributes.start_time DESC",),
        max_results: int | None = None,
        include_deleted: bool = False,
    ) -> list[RunRecord]:
        """All runs matching ``filter_string`` (every page), newest first by default."""
        return list(
            self.iter_search(
                experiment_ids,
                filter_string,
                order_by=order_by,
                max_results=max_results,
                include_deleted=include_deleted,
            )
        )

    def iter_search(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = ("attributes.start_time DESC",),
        max_results: int | None = None,
        include_deleted: bool = False,
    ) -> Iterator[RunRecord]:
        from mlflow.entities import ViewType

        view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
        token: str | None = None
        seen = 0
        while True:
            page_size = 1000 if max_results is None else min(1000, max_results - seen)
            page = self._call(
                lambda page_size=page_size, token=token: self.client.search_runs(  # type: ignore[misc]
                    list(experiment_ids),
                    filter_string=filter_string,
                    run_view_type=view,
                    max_results=page_size,
                    order_by=list(order_by),
                    page_token=token,
                ),
                what="search_runs",
            )
            for run in page:
                yield _record(run)
                seen += 1
            token = page.token
            if not token or (max_results is not None and seen >= max_results):
                return

    # Logging -----------------------------------------------------------------

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[tuple[str, float, int, int]] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Send one batch: metrics as (key, value, timestamp_ms, step) tuples.

        Re-sending the same batch is harmless: MLflow ignores a metric point with the
        same key, value, timestamp and step, a param with the same value, and tags are
        upserts. The logger's exactly-once guarantee rests on this.
        """
        from mlflow.entities import Metric, Param, RunTag

        metric_entities = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
        param_entities = [Param(k, v) for k, v in (params or {}).items()]
        tag_entities = [RunTag(k, v) for k, v in (tags or {}).items()]
        self._call(
            lambda: self.client.log_batch(
                run_id,
                metrics=metric_entities,
                params=param_entities,
                tags=tag_entities,
                synchronous=True,
            ),
            what="log_batch",
        )

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        self._call(
            lambda: self.client.log_artifact(run_id, local_path, artifact_path),
            what="upload artifact",
            timeout=max(self.timeout, ARTIFACT_TIMEOUT),
        )

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None) -> None:
        self._call(
            lambda: self.client.log_artifacts(run_id, local_dir, artifact_path),
            what="upload artifacts",
            timeout=max(self.timeout, ARTIFACT_TIMEOUT),
        )

    # Push support ------------------------------------------------------------
    # For _push.py (``trainkit-tracking push``): copy whole runs between stores with
    # their original times, full metric histories and artifacts.

    def find_experiment_by_name(self, name: str) -> PushExperiment | None:
        """The experiment ``name`` (deleted ones included), or None when there is none."""
        found = self._call(
            lambda: self.client.get_experiment_by_name(name), what="get_experiment_by_name"
        )
        if found is None:
            return None
        return PushExperiment(
            str(found.experiment_id),
            str(found.name),
            found.lifecycle_stage == "deleted",
            dict(found.tags or {}),
        )

    def create_tagged_experiment(self, name: str, tags: Mapping[str, str]) -> str | None:
        """Create experiment ``name`` with ``tags`` in one call; None when it already exists."""
        try:
            return str(
                self._call(
                    lambda: self.client.create_experiment(name, tags=dict(tags)),
                    what="create_experiment",
                )
            )
        except Exception as exc:
            if error_code(exc) == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc):
                return None
            raise

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self._call(
            lambda: self.client.set_experiment_tag(experiment_id, key, value),
            what="set_experiment_tag",
        )

    def active_experiments(self) -> list[PushExperiment]:
        """Every active experiment (every page), with its tags."""
        return [
            PushExperiment(str(e.experiment_id), str(e.name), False, dict(e.tags or {}))
            for e in self._experiment_pages()
        ]

    def search_latest(
        self, experiment_ids: Sequence[str], filter_string: str = "", *, include_deleted: bool
    ) -> list[PushRun]:
        """Runs with their latest point per metric key (value, timestamp, step), every page."""
        from mlflow.entities import ViewType

        view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
        found: list[PushRun] = []
        token: str | None = None
        while True:
            page = self._call(
                lambda token=token: self.client.search_runs(  # type: ignore[misc]
                    list(experiment_ids),
                    filter_string=filter_string,
                    run_view_type=view,
                    max_results=1000,
                    order_by=["attributes.start_time ASC"],
                    page_token=token,
                ),
                what="search_runs",
            )
            for run in page:
                # RunData keeps the Metric objects of the latest points in _metric_objs
                # (mlflow/entities/run_data.py); .metrics only has their values.
                objs = getattr(run.data, "_metric_objs", None) or []
                latest = {str(m.key): (float(m.value), int(m.timestamp), int(m.step)) for m in objs}
                deleted = run.info.lifecycle_stage == "deleted"
                found.append(PushRun(_record(run), latest, deleted))
            token = page.token
            if not token:
                return found

    def create_run_at(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str], start_time: int | None
    ) -> RunRecord:
        run = self._call(
            lambda: self.client.create_run(
                experiment_id, start_time=start_time, tags=dict(tags), run_name=run_name
            ),
            what="create_run",
        )
        return _record(run)

    def metric_history(self, run_id: str, key: str) -> list[tuple[str, float, int, int]]:
        """Every point of metric ``key`` as (key, value, timestamp_ms, step)."""
        rows = self._sql_history(run_id, key)
        if rows is not None:
            return rows
        history = self._call(
            lambda: self.client.get_metric_history(run_id, key),
            what="get_metric_history",
            timeout=max(self.timeout, ARTIFACT_TIMEOUT),
        )
        return [(key, m.value, m.timestamp, m.step) for m in history]

    def _sql_history(self, run_id: str, key: str) -> list[tuple[str, float, int, int]] | None:
        """A SQL store's points of ``key`` read with SQLAlchemy Core from MLflow's own
        metrics table model: several times faster than get_metric_history, which builds
        an ORM object and an entity per point. None: not a SQL store, use the client."""
        if getattr(self, "_push_sql", True) is False:
            return None
        try:
            import sqlalchemy as sa
            from mlflow.store.tracking.dbmodels.models import SqlMetric
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
            if not isinstance(store, SqlAlchemyStore):
                raise TypeError(f"{type(store).__name__} is not a SQL store")
            table: Any = SqlMetric.__table__
            engine = store.engine
        except Exception as exc:
            log.debug("metric histories through the client: %s", exc)
            self._push_sql = False
            return None
        columns = (table.c.value, table.c.timestamp, table.c.step, table.c.is_nan)
        query = sa.select(*columns).where(table.c.run_uuid == run_id, table.c.key == key)

        def read() -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(query).all())

        nan = float("nan")
        return [
            (key, nan if is_nan else float(value), int(timestamp), int(step))
            for value, timestamp, step, is_nan in self._call(
                read, what="read metric history", timeout=max(self.timeout, ARTIFACT_TIMEOUT)
            )
        ]

    def artifact_files(self, run_id: str) -> dict[str, int]:
        """Every artifact file of the run (recursively): path -> size in bytes (-1: unknown)."""
        files: dict[str, int] = {}
        pending: list[str | None] = [None]
        while pending:
            folder = pending.pop()
            entries = self._call(
                lambda folder=folder: self.client.list_artifacts(run_id, folder),  # type: ignore[misc]
                what="list_artifacts",
                timeout=max(self.timeout, ARTIFACT_TIMEOUT),
            )
            for entry in entries:
                if entry.is_dir:
                    pending.append(str(entry.path))
                else:
                    size = entry.file_size
                    files[str(entry.path)] = -1 if size is None else int(size)
        return files

    def download_artifact(self, run_id: str, path: str, dst_dir: str) -> str:
        return str(
            self._call(
                lambda: self.client.download_artifacts(run_id, path, dst_dir),
                what="download_artifacts",
                timeout=max(self.timeout, ARTIFACT_TIMEOUT),
            )
        )


@dataclass(frozen=True)
class PushExperiment:
    """An experiment as push sees it (Push support)."""

    experiment_id: str
    name: str
    deleted: bool
    tags: Mapping[str, str]


@dataclass(frozen=True)
class PushRun:
    """A run with its latest point per metric key: (value, timestamp, step) (Push support)."""

    record: RunRecord
    latest: Mapping[str, tuple[float, int, int]]
    deleted: bool


_hide_queue: queue.SimpleQueue[tuple[Store, str] | None] = queue.SimpleQueue()
_hide_thread: threading.Thread | None = None
_hide_lock = threading.Lock()


def _hide_worker() -> None:
    while (item := _hide_queue.get()) is not None:
        store, claim_id = item
        store.hide_claim(claim_id)


def _drain_hides() -> None:
    if _hide_thread is not None and _hide_thread.is_alive():
        _hide_queue.put(None)
        _hide_thread.join(timeout=5.0)


def _hide_later(store: Store, claim_id: str) -> None:
    """Soft-delete a claim off the run-creation path (a daemon thread, drained at exit)."""
    global _hide_thread
    with _hide_lock:
        if _hide_thread is None or not _hide_thread.is_alive():
            _hide_thread = threading.Thread(
                target=_hide_worker, name="trainkit-claims", daemon=True
            )
            _hide_thread.start()
            atexit.register(_drain_hides)
    _hide_queue.put((store, claim_id))


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=str(info.run_id),
        experiment_id=str(info.experiment_id),
        name=str(info.run_name or data.tags.get("mlflow.runName", "")),
        status=str(info.status),
        start_time=info.start_time,
        end_time=info.end_time,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
    )
