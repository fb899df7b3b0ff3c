"""The in-process side of one store: heartbeats, and sending what no spool could keep.

The journal's entries are sent by the store's sender (``sender.py``); this thread sets the
runs' heartbeat tags, and sends in order, with backoff, only the entries of a run whose
journal cannot be written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._journal.channel import Channel
from trainkit_tracking._journal.delivery import StoreDown, deliver
from trainkit_tracking._journal.ledger import Record, Settled
from trainkit_tracking._store.store import Store

log = get_logger(__name__)

MAX_BACKOFF = 15.0


WAKE = object()  # put in a Sender's outbox to look at the heartbeat schedule again


class Heartbeat:
    """The in-process side of one tracking URI: heartbeats, and sending what no spool
    could keep (a spool dir that is not writable), in order, with backoff."""

    def __init__(
        self,
        uri: str,
        timeout: float,
        *,
        channels: Callable[[str], list[Channel]],
        settled: Callable[[Channel], None],
    ) -> None:
        self.channels = channels  # the worker's channels of a store
        self.settled = settled  # the worker closes a channel once all is settled
        self.uri = uri
        self.store = Store(uri, timeout=timeout, retries=False)  # the sender has its own backoff
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.down = False  # the last try failed with a transient error
        self.outage_waited = False  # a wait timed out since the last record was stored
        self._stopped = threading.Event()
        threading.Thread(target=self._loop, name="trainkit-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self.outbox.put(None)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                item = self.outbox.get(timeout=self._until_heartbeat())
            except queue.Empty:
                item = None
            if item is not None and item is not WAKE:
                channel, record = item
                try:
                    self._deliver(channel, record)
                except Exception:  # this thread must go on
                    log.exception("trainkit-tracking sender failed on run %s", channel.run_id)
            try:
                self._heartbeats()
            except Exception:
                log.exception("trainkit-tracking heartbeat failed")

    def _deliver(self, channel: Channel, record: Record) -> None:
        """An entry no journal keeps: sent from here, in order, with backoff while the store
        is unreachable; set aside (with its warning) when it cannot be stored."""
        attempt = 0
        while not self._stopped.is_set():
            try:
                outcome = deliver(self.store, channel.run_id, record)
            except StoreDown as exc:
                attempt += 1
                self.down = True
                delay = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)
                log.debug("store %s unavailable (%s); retry in %.1fs", self.uri, exc, delay)
                self._stopped.wait(delay)
                continue
            self.down = self.outage_waited = False
            if outcome.aside:
                channel.warn_aside(
                    Settled(record["n"], tuple(f"{a.what} ({a.why})" for a in outcome.aside))
                )
            self._done(channel, record, ok=not outcome.aside)
            return

    def _done(self, channel: Channel, record: Record, *, ok: bool) -> None:
        with channel.lock:
            channel.memory_points -= len(record.get("m", ())) if record["t"] == "b" else 0
        channel.settle(record["n"], ok=ok, in_file=False)
        self.settled(channel)

    def _until_heartbeat(self) -> float:
        due = [c.next_heartbeat for c in self.channels(self.uri) if c.heartbeat_on]
        return max(0.01, min(due, default=time.monotonic() + 1.0) - time.monotonic())

    def _heartbeats(self) -> None:
        if self.down:  # the store is down: a heartbeat would only hold back the data
            return
        now = time.monotonic()
        for channel in self.channels(self.uri):
            if channel.heartbeat_on and channel.next_heartbeat <= now:
                channel.next_heartbeat = now + channel.heartbeat_interval
                try:
                    now_s = str(int(time.time()))
                    beat = {channel.heartbeat_tag: now_s}
                    if channel.holder_tag is not None:
                        beat[channel.holder_tag] = now_s
                    self.store.set_tags(channel.run_id, beat)
                except Exception as exc:  # a missed beat is harmless; the next one comes
                    channel.beat_missed = True
                    log.debug("heartbeat of run %s failed: %s", channel.run_id, exc)
                else:
                    _answered(channel)


def _answered(channel: Channel) -> None:
    """A beat was stored: after missed ones, the store answers again from now on."""
    if channel.beat_missed:
        channel.beat_missed = False
        channel.answered_since = time.time()
