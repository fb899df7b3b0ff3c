"""Creating a run exactly once: a random id tagged at creation lets a retry find the run the
first try may have made, and a run whose creation answered after the caller gave up (and
went offline, or raised) is deleted, so that no orphan RUNNING run is left behind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainkit_tracking._core.redact import get_logger

log = get_logger(__name__)


@dataclass
class CreateCalls:
    """The calls of one creation: ``create``, and the ``retry``/``on_late`` guards."""

    create: Callable[[], Any]
    guards: dict[str, Any] = field(default_factory=dict)


def calls(
    client: Any,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str],
    start_time: int | None,
    id_tag: str | None,
) -> CreateCalls:
    """What ``Store.create_run`` passes through its one door."""

    def create() -> Any:
        return client.create_run(
            experiment_id, start_time=start_time, tags=dict(tags), run_name=run_name
        )

    creation_id = tags.get(id_tag) if id_tag else None
    if creation_id is None:
        return CreateCalls(create)

    def find_or_create() -> Any:
        from mlflow.entities import ViewType

        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{id_tag}` = '{creation_id}'",
            run_view_type=ViewType.ALL,
            max_results=1,
        )
        return found[0] if found else create()

    def undo(run: Any) -> None:
        log.info("deleting run %s: its creation answered after it was given up", run.info.run_id)
        client.delete_run(run.info.run_id)

    return CreateCalls(create, {"retry": find_or_create, "on_late": undo})
