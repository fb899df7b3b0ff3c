"""Copy runs from one MLflow store into another, exactly once and incrementally (``push``).

A target run is found again by its ``code.pushed_from`` tag (set when it is created), and
only what the target lacks is sent; a ``code.push.sync_mark`` digest skips unchanged runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from trainkit_tracking._core.platform import detect_platform, local_store_path, local_store_uri
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.suggest import did_you_mean
from trainkit_tracking._core.uris import check_tracking_uri
from trainkit_tracking._process.file_lock import try_lock
from trainkit_tracking._push import store_calls as _push_store
from trainkit_tracking._push.background_calls import call as _call
from trainkit_tracking._push.background_calls import lanes as _lanes
from trainkit_tracking._push.marks import (
    HIDDEN_PREFIX,
    PUSH_TO,
    REMOTE_PARENT,
    STORE_EXPERIMENT,
    STORE_ID_TAG,
    Source,
    lineage_refs,
    read_source,
)
from trainkit_tracking._push.report import Counter, Progress, PushedRun, PushReport
from trainkit_tracking._push.run_copy import Pusher
from trainkit_tracking._runs.resolve import plugin_schemes
from trainkit_tracking._store.store import Store
from trainkit_tracking.errors import TrackingError

__all__ = ["PushReport", "PushedRun", "default_source_uri", "push"]

log = logging.getLogger(__name__)


def default_source_uri(project: str | None = None) -> str:
    """The local store of this machine, found as the Tracker finds it."""
    path = local_store_path(detect_platform(), cwd=Path.cwd(), project=project)
    return local_store_uri(path)


def push(
    from_uri: str | None = None,
    to_uri: str | None = None,
    experiment: str | None = None,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    timeout: float = 30.0,
    verify: bool = False,
    project: str | None = None,
) -> PushReport:
    """Copy runs of the store ``from_uri`` into ``to_uri``, exactly once.

    Without ``from_uri``: the local store of this machine, and only the runs marked
    ``code.push_to`` (with their parents). Without ``to_uri``: each run goes to the
    target recorded in its ``code.push_to`` tag. ``experiment`` limits the push to one
    experiment (by name). ``timeout`` bounds each call to either store (seconds);
    ``verify`` compares full histories even of runs whose sync mark says unchanged.
    ``project`` locates the local store on Colab (as ``Tracker(project=...)``).
    """
    source_uri = from_uri or default_source_uri(project)
    if to_uri:  # a mistyped target fails now, not after the source was read
        check_tracking_uri(to_uri, "--to", os.environ, plugin_schemes)
    source = Store(source_uri)
    shown = redact_value(source_uri)
    _check_reachable(source_uri, timeout, role="source")
    marked_only = from_uri is None or to_uri is None
    with _source_lock(source_uri), _lanes():
        selected = _select(source, experiment, marked_only=marked_only, timeout=timeout)
        store_id = _store_id(source, create=not dry_run and bool(selected), timeout=timeout)
        report = PushReport(source=shown, store_id=store_id, dry_run=dry_run)
        groups = {
            target: _closure(source, runs, selected, timeout)
            for target, runs in _group_by_target(selected, to_uri, source_uri).items()
        }
        counter = Counter(sum(len(runs) for runs in groups.values()), progress)
        for target_uri, runs in groups.items():
            checked = _check_target(target_uri, timeout)
            pusher = Pusher(
                source, Store(checked), store_id, report, counter, dry_run, timeout, verify
            )
            pusher.push_all(runs)
    return report


def _check_target(uri: str, timeout: float) -> str:
    _check_reachable(uri, timeout, role="target")
    if uri.startswith("azureml://"):
        from trainkit_tracking._store import azure as _azure

        try:
            return _azure.connect(uri, None, timeout=timeout)
        except Exception as exc:  # AzureUnavailable says what is missing and what to do
            raise TrackingError(f"the target {redact_value(uri)}: {exc}") from exc
    return uri


# Selection --------------------------------------------------------------------


def _check_reachable(uri: str, timeout: float, *, role: str) -> None:
    shown = redact_value(uri)
    if "***" in uri:
        raise TrackingError(
            f"the {role} store {shown!r} has its credentials redacted; pass the full URI "
            f"({'--from' if role == 'source' else '--to'} URI, credentials may come from "
            "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
        )
    check_tracking_uri(uri, "--from" if role == "source" else "--to", os.environ, plugin_schemes)
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        import socket

        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection(
                (parts.hostname or "localhost", port), timeout=min(timeout, 5.0)
            ):
                pass
        except OSError as exc:
            raise TrackingError(
                f"the {role} store {shown} cannot be reached: {exc}; check that the server "
                "runs and the URI is right"
            ) from exc
    elif uri.startswith("sqlite:///") and role == "source":
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).exists():
            raise TrackingError(
                f"no tracking store at {path!r}: nothing has been tracked there; pass --from URI"
            )


@contextlib.contextmanager
def _source_lock(uri: str) -> Iterator[None]:
    """One push at a time per sqlite source: two at once could both create a target run."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        yield
        return
    lock = Path(path).with_name(Path(path).name + ".push.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only folder: nobody else can write there either
        log.debug("no push lock beside %s: %s", path, exc)
        yield
        return
    try:
        if not try_lock(fd):
            raise TrackingError(
                f"another push of {str(Path(path))!r} is running (lock {str(lock)!r}); "
                "wait for it to end, then push again"
            )
        yield
    finally:
        os.close(fd)


def _select(
    store: Store, experiment: str | None, *, marked_only: bool, timeout: float
) -> list[Source]:
    experiments = [
        e
        for e in _call(lambda: _push_store.active_experiments(store), timeout, "the source store")
        if not e.name.startswith(HIDDEN_PREFIX)
    ]
    if experiment is not None:
        named = [e for e in experiments if experiment in (e.name, e.experiment_id)]
        if not named:
            hint = did_you_mean(experiment, [e.name for e in experiments])
            raise TrackingError(
                f"experiment {experiment!r} not found in the source store "
                f"{redact_value(store.tracking_uri)}; {hint + ' ' if hint else ''}check the "
                "name or pass --from"
            )
        experiments = named
    filter_string = f"tags.`{PUSH_TO}` LIKE '%'" if marked_only else ""
    selected: list[Source] = []
    for exp in experiments:
        runs = _call(
            lambda exp_id=exp.experiment_id: _push_store.search_latest(
                store,  # type: ignore[misc]
                [exp_id],
                filter_string,
                include_deleted=False,
            ),
            timeout,
            "search_runs",
        )
        selected.extend(Source(run, exp.name) for run in runs)
    return selected


def _group_by_target(
    selected: Sequence[Source], to_uri: str | None, source_uri: str
) -> dict[str, list[Source]]:
    groups: dict[str, list[Source]] = {}
    for src in selected:
        target = to_uri or src.tags.get(PUSH_TO)
        if not target:
            raise TrackingError(
                f"run {src.id!r} has no {PUSH_TO} tag and no target was given; pass --to URI"
            )
        if target == source_uri:
            raise TrackingError(
                f"the source and the target are the same store ({redact_value(target)}); "
                "pass another --to"
            )
        groups.setdefault(target, []).append(src)
    for target in groups:
        if "***" in target:
            raise TrackingError(
                f"the recorded target {target!r} has its credentials redacted; "
                "pass the full URI with --to"
            )
    return groups


def _closure(
    store: Store, runs: list[Source], selected: Sequence[Source], timeout: float
) -> list[Source]:
    """``runs`` plus their source ancestors (a child needs its parent in the target), in
    tree order: parents first, and lineage sources before the runs that point at them."""
    known = {src.id: src for src in selected}
    chosen: dict[str, Source] = {src.id: src for src in runs}
    pending = list(runs)
    while pending:
        src = pending.pop()
        parent = src.run.record.parent_id
        if parent is None or src.tags.get(REMOTE_PARENT) or parent in chosen:
            continue
        found = known.get(parent) or read_source(store, parent, timeout)
        if found is not None:
            chosen[parent] = found
            pending.append(found)
    ordered: list[Source] = []
    done: set[str] = set()

    def visit(src: Source, path: frozenset[str]) -> None:
        if src.id in done or src.id in path:
            return
        for ref in [src.run.record.parent_id, *lineage_refs(src.tags).values()]:
            if ref is not None and ref in chosen:
                visit(chosen[ref], path | {src.id})
        done.add(src.id)
        ordered.append(src)

    for src in sorted(chosen.values(), key=lambda s: (s.run.record.start_time or 0, s.id)):
        visit(src, frozenset())
    return ordered


def _store_id(store: Store, *, create: bool, timeout: float) -> str | None:
    """The source store's id: a UUID kept as a tag of a hidden experiment in the store,
    so it travels with a copied database file (a path or URI would not)."""
    for _ in range(3):
        found = _call(
            lambda: _push_store.find_experiment_by_name(store, STORE_EXPERIMENT),
            timeout,
            "get_experiment",
        )
        if found is not None and found.tags.get(STORE_ID_TAG):
            return found.tags[STORE_ID_TAG]
        if not create:
            return None
        if found is not None:  # made by an older or interrupted writer without its tag
            exp_id, new_id = found.experiment_id, uuid.uuid4().hex
            _call(
                lambda e=exp_id, n=new_id: _push_store.set_experiment_tag(
                    store, e, STORE_ID_TAG, n
                ),  # type: ignore[misc]
                timeout,
                "set_experiment_tag",
            )
            continue
        _call(
            lambda: _push_store.create_tagged_experiment(
                store, STORE_EXPERIMENT, {STORE_ID_TAG: uuid.uuid4().hex}
            ),
            timeout,
            "create_experiment",
        )
        # Read back: a racing push may have created it first; its id wins.
    raise TrackingError(
        f"could not read or create the store id (experiment {STORE_EXPERIMENT!r}) in "
        f"{redact_value(store.tracking_uri)}"
    )
