"""What a pushed run is called in the target: a version claimed there for versioned runs,
and a lineage description that links the target's runs.

A run created offline got its ``_N`` in the local store; the target may already hold a
run of that name. The target run gets the next version claimed in the target (the claims
every Tracker makes), so no two runs there share a name; the offline name is kept in
``code.offline_name``. A push that finds its run again keeps the target's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from trainkit_tracking._core.naming import renumbered
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._push.background_calls import call
from trainkit_tracking._push.marks import Source
from trainkit_tracking._runs.lineage import NOTE_HEAD, lineage_links, lineage_note, reader
from trainkit_tracking._runs.resolve import run_url
from trainkit_tracking._store.store import RunRecord, Store
from trainkit_tracking._store.versions import Versions

KEYS = TagKeys.default()
RUN_NAME = KEYS["mlflow_run_name"]


class TargetNames:
    """Names and descriptions of pushed runs in one target store."""

    def __init__(self, target: Store, timeout: float) -> None:
        self.target, self.timeout = target, timeout
        self.versions = Versions(KEYS["base_name"], KEYS["version"])

    def settle(
        self,
        src: Source,
        existing: RunRecord | None,
        tags: dict[str, str],
        experiment_id: Callable[[], str | None],
        *,
        write: bool,
    ) -> None:
        """Put the target's name (claimed now for a new run, when ``write``) and lineage
        description into ``tags``, the tags the target run of ``src`` must have."""
        if existing is not None:
            tags.update(self.kept(src, existing))
        elif write:
            target_experiment = experiment_id()
            assert target_experiment is not None  # created when writing
            tags.update(self.claim(src, target_experiment))
        if write:
            tags.update(self.note(tags))

    def versioned(self, src: Source) -> tuple[str, int] | None:
        """(base name, version) of a run that got a version when it was created, else None."""
        base, version = src.tags.get(KEYS["base_name"]), src.tags.get(KEYS["version"], "")
        if not base or not version.isdigit():
            return None
        if renumbered(src.run.record.name, base, int(version), int(version)) is None:
            return None  # renamed by hand since: its name is its own
        return base, int(version)

    def claim(self, src: Source, experiment_id: str) -> dict[str, str]:
        """The name tags of a new target run of ``src``: for a versioned run, a version
        claimed in the target (its offline name kept); else none (the name is kept)."""
        found = self.versioned(src)
        if found is None:
            return {}
        base, old = found
        new = call(
            lambda: self.versions.assign(self.target, experiment_id, base),
            self.timeout,
            "claim version",
        )
        name = renumbered(src.run.record.name, base, old, new)
        assert name is not None  # versioned() checked that the name has its version
        return self._name_tags(src, name, str(new))

    def kept(self, src: Source, target: RunRecord) -> dict[str, str]:
        """The name tags of a run pushed before: the target's, so a push never renames it."""
        found = self.versioned(src)
        if found is None:
            return {}
        # A run pushed by an SDK that did not claim versions has the source's number.
        version = target.tags.get(KEYS["version"]) or str(found[1])
        return self._name_tags(src, target.name, version)

    @staticmethod
    def _name_tags(src: Source, name: str, version: str) -> dict[str, str]:
        offline = src.tags.get(KEYS["offline_name"]) or src.run.record.name
        return {
            RUN_NAME: name,
            KEYS["run_name"]: name,
            KEYS["version"]: version,
            KEYS["offline_name"]: offline,
        }

    def note(self, tags: Mapping[str, str]) -> dict[str, str]:
        """The lineage description again, for the target's runs (names, links), when the
        source's was written by the SDK; else nothing (a user's own text is copied as is)."""
        current = tags.get(KEYS["description"], "")
        if not current.startswith(NOTE_HEAD):
            return {}
        links = lineage_links(tags, KEYS)
        uri = self.target.tracking_uri
        note = call(
            lambda: lineage_note(
                links,
                reader(self.target),
                lambda record: run_url(uri, record.experiment_id, record.run_id),
            ),
            self.timeout,
            "get_run",
        )
        return {} if note is None else {KEYS["description"]: note}
