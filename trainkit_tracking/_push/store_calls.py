"""What push needs of a store beyond the SDK's own calls: experiments with their tags, runs
with their latest points, artifact listings and downloads; every call through ``Store._call``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trainkit_tracking._store.bounded_client import is_already_exists
from trainkit_tracking._store.store import ARTIFACT_TIMEOUT, RunRecord, Store, record_of


@dataclass(frozen=True)
class PushExperiment:
    """An experiment as push sees it."""

    experiment_id: str
    name: str
    deleted: bool
    tags: Mapping[str, str]


@dataclass(frozen=True)
class PushRun:
    """A run with its latest point per metric key: (value, timestamp, step)."""

    record: RunRecord
    latest: Mapping[str, tuple[float, int, int]]
    deleted: bool


def find_experiment_by_name(store: Store, name: str) -> PushExperiment | None:
    """The experiment ``name`` (deleted ones included), or None when there is none."""
    found = store._call(
        lambda: store.client.get_experiment_by_name(name), what="get_experiment_by_name"
    )
    if found is None:
        return None
    return PushExperiment(
        str(found.experiment_id),
        str(found.name),
        found.lifecycle_stage == "deleted",
        dict(found.tags or {}),
    )


def create_tagged_experiment(store: Store, name: str, tags: Mapping[str, str]) -> str | None:
    """Create experiment ``name`` with ``tags`` in one call; None when it already exists."""
    try:
        return str(
            store._call(
                lambda: store.client.create_experiment(name, tags=dict(tags)),
                what="create_experiment",
            )
        )
    except Exception as exc:
        if is_already_exists(exc):
            return None
        raise


def set_experiment_tag(store: Store, experiment_id: str, key: str, value: str) -> None:
    store._call(
        lambda: store.client.set_experiment_tag(experiment_id, key, value),
        what="set_experiment_tag",
    )


def active_experiments(store: Store) -> list[PushExperiment]:
    """Every active experiment (every page), with its tags."""
    return [
        PushExperiment(str(e.experiment_id), str(e.name), False, dict(e.tags or {}))
        for e in store._experiment_pages()
    ]


def search_latest(
    store: Store, experiment_ids: Sequence[str], filter_string: str = "", *, include_deleted: bool
) -> list[PushRun]:
    """Runs with their latest point per metric key (value, timestamp, step), every page."""
    found: list[PushRun] = []
    for page in store.run_pages(
        experiment_ids,
        filter_string,
        order_by=("attributes.start_time ASC",),
        include_deleted=include_deleted,
    ):
        for run in page:
            # RunData keeps the Metric objects of the latest points in _metric_objs
            # (mlflow/entities/run_data.py); .metrics only has their values.
            objs = getattr(run.data, "_metric_objs", None) or []
            latest = {str(m.key): (float(m.value), int(m.timestamp), int(m.step)) for m in objs}
            deleted = run.info.lifecycle_stage == "deleted"
            found.append(PushRun(record_of(run), latest, deleted))
    return found


def artifact_files(store: Store, run_id: str) -> dict[str, int]:
    """Every artifact file of the run (recursively): path -> size in bytes (-1: unknown)."""
    files: dict[str, int] = {}
    pending: list[str | None] = [None]
    while pending:
        folder = pending.pop()
        entries = store._call(
            lambda folder=folder: store.client.list_artifacts(run_id, folder),  # type: ignore[misc]
            what="list_artifacts",
            timeout=max(store.timeout, ARTIFACT_TIMEOUT),
        )
        for entry in entries:
            if entry.is_dir:
                pending.append(str(entry.path))
            else:
                size = entry.file_size
                files[str(entry.path)] = -1 if size is None else int(size)
    return files


def download_artifact(store: Store, run_id: str, path: str, dst_dir: str) -> str:
    return str(
        store._call(
            lambda: store.client.download_artifacts(run_id, path, dst_dir),
            what="download_artifacts",
            timeout=max(store.timeout, ARTIFACT_TIMEOUT),
        )
    )
