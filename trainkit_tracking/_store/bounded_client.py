"""The one door to the store: every call bounded by a deadline (MLflow's own HTTP retries
inside it), transient errors retried, http stores probed, errors classified once.

Knows nothing of MLflow's API: ``_store.Store`` makes the client and the calls.
"""

from __future__ import annotations

import abc
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from trainkit_tracking._core.redact import get_logger, redact_value, scrub_chain, warn
from trainkit_tracking._process import bounded as _timeout
from trainkit_tracking._process.file_lock import try_lock
from trainkit_tracking._store.classify import error_code as error_code
from trainkit_tracking._store.classify import is_already_exists as is_already_exists
from trainkit_tracking._store.classify import is_local_file_error as is_local_file_error
from trainkit_tracking._store.classify import is_network_error as is_network_error
from trainkit_tracking._store.classify import is_transient as is_transient
from trainkit_tracking.errors import StoreUnavailableError

log = get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C")

DEFAULT_TIMEOUT = 30.0
# A refused connection is retried this long (a server restarting), then reported.
REFUSED_GRACE = 3.0
# After this long without an answer, a call in the foreground says what it waits for.
WAIT_NOTICE = 5.0
# Creating a fresh sqlite schema takes ~6 s; processes queue for it behind a lock.
SQLITE_INIT_TIMEOUT = 300.0


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


class BoundedClient(abc.ABC, Generic[C]):
    """A client of one store, every call through ``_call``: bounded, retried and classified."""

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
        self._client: C | None = None
        self._client_lock = threading.Lock()
        self._reachable = _http_address(tracking_uri) is None  # only http(s) stores are probed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.shown_uri!r})"

    def _unavailable(self, what: str, waited: float, reason: str) -> StoreUnavailableError:
        loading = getattr(self, "_loading", 0.0)
        first = f", after {loading:.1f} s loading MLflow" if loading >= 0.5 else ""
        return StoreUnavailableError(
            f"the tracking store {self.shown_uri} did not answer {what} within {waited:.1f} s "
            f"({redact_value(reason)}{first}); check that it is running and reachable (`trainkit-"
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

    def _call(
        self,
        call: Callable[[], T],
        *,
        what: str,
        timeout: float | None = None,
        retry: Callable[[], T] | None = None,
        on_late: Callable[[T], None] | None = None,
    ) -> T:
        """``_bounded_call`` (below), with credentials masked in whatever it raises."""
        try:
            return self._bounded_call(
                call, what=what, timeout=timeout, retry=retry, on_late=on_late
            )
        except Exception as exc:
            scrub_chain(exc)
            raise

    def _bounded_call(
        self,
        call: Callable[[], T],
        *,
        what: str,
        timeout: float | None = None,
        retry: Callable[[], T] | None = None,
        on_late: Callable[[T], None] | None = None,
    ) -> T:
        """The one door to MLflow: ``call`` bounded by the deadline, transient errors retried.

        MLflow's own HTTP retries run inside the bounded call, so they end at the deadline
        too; while the call is out, an http store's port is probed every second, so that a
        store that died (its port refusing) is given up on within seconds. A permanent
        error is raised at once, as MLflow raised it. ``retry``: what to call instead of
        ``call`` the second time (a creation looks for what the first try may have made);
        ``on_late``: what to do with an answer that came after the caller gave up.
        """
        # The deadline starts once the client is open (importing mlflow takes seconds and
        # waits on no network); messages say both times, as they were.
        opening = time.monotonic()
        client = self.client
        assert client is not None
        started = time.monotonic()
        self._loading = started - opening
        deadline = started + (self.timeout if timeout is None else timeout)
        delay = 0.05
        attempt = call
        while True:
            # The background sender (retries=False) checks before every call: MLflow's own
            # retries of a refused connection would otherwise hold it for the whole bound.
            if not self._reachable or not self.retries:
                self._probe(what, started, deadline)
            remaining = deadline - time.monotonic()
            try:
                return _timeout.bounded(
                    attempt,
                    timeout=remaining,
                    what=what,
                    watch=self._watcher(what, started, deadline),
                    on_late=on_late,
                )
            except _timeout.Abandoned as exc:
                self._reachable = _http_address(self.tracking_uri) is None
                raise self._unavailable(what, time.monotonic() - started, "no answer") from exc
            except StoreUnavailableError:
                self._reachable = False
                raise
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
                attempt = retry or call

    def _watcher(
        self, what: str, started: float, deadline: float
    ) -> Callable[[float], None] | None:
        """While a call is out: probe an http store's port (a refused port for
        ``REFUSED_GRACE`` seconds gives up), and say once, after ``WAIT_NOTICE`` seconds,
        what is awaited and for how long at most."""
        address = _http_address(self.tracking_uri)
        refused_since: list[float] = []
        told: list[bool] = []

        def watch(waited: float) -> None:
            now = time.monotonic()
            if address is not None:
                try:
                    probe(self.tracking_uri, min(1.0, max(deadline - now, 0.01)))
                    refused_since.clear()
                except ConnectionRefusedError as exc:
                    refused_since.append(now)
                    if now - refused_since[0] >= REFUSED_GRACE:
                        raise self._unavailable(what, now - started, "connection refused") from exc
                except OSError:  # a slow or silent network: the deadline decides
                    pass
            if self.retries and waited >= WAIT_NOTICE and not told:
                told.append(True)
                warn(
                    f"waiting for the tracking store {self.shown_uri} to answer {what} "
                    f"({waited:.0f} s so far, at most {deadline - started:.0f} s: "
                    "Tracker(timeout=...) / TRAINKIT_TIMEOUT)"
                )

        return watch

    def _prepare_open(self) -> None:
        """What opening needs that takes no lock (imports): done before the sqlite lock."""

    @abc.abstractmethod
    def _open_client(self) -> C:
        """The client of ``tracking_uri``; the only place where it is made."""

    @property
    def client(self) -> C:
        """The client, opened once; a sqlite store is opened under a lock file.

        Opening imports mlflow (seconds on a loaded machine) and, for sqlite, checks or
        creates the schema: it happens before a call's deadline starts, since it does not
        wait on the network (MlflowClient does not contact an http store until called).
        """
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    db = sqlite_path(self.tracking_uri)
                    if db is None:
                        self._client = self._open_client()
                    else:
                        # Opening the store creates/migrates the schema. The imports (~5 s
                        # on a loaded machine) come first, outside the lock: N processes
                        # opening one store at once had queued for N x 5 s.
                        self._prepare_open()
                        deadline = time.monotonic() + max(self.timeout, SQLITE_INIT_TIMEOUT)
                        with _sqlite_init_lock(db, deadline):
                            self._client = self._open_client()
        return self._client

    @property
    def is_local(self) -> bool:
        """Whether the store is a file on this machine (sqlite, or MLflow's file store)."""
        return self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
