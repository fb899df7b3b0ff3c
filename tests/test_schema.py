"""RunSpec's JSON schema is pinned by a committed snapshot: changing it is a deliberate act.

Update the snapshot with `.venv/bin/python tests/test_schema.py --update`, and say in
CHANGELOG.md what changed for users (a removed or narrowed field is a breaking change).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "runspec.schema.json"
UPDATE_COMMAND = ".venv/bin/python tests/test_schema.py --update"


def current_schema() -> dict[str, Any]:
    from trainkit_tracking import RunSpec

    schema: dict[str, Any] = RunSpec.model_json_schema()
    return schema


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def _top_level_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which properties were added, removed or changed: enough to find the change."""
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    parts = [
        f"added {sorted(set(new_props) - set(old_props))}",
        f"removed {sorted(set(old_props) - set(new_props))}",
        f"changed {sorted(k for k in set(old_props) & set(new_props) if old_props[k] != new_props[k])}",
    ]
    if old.get("required") != new.get("required"):
        parts.append(f"required {old.get('required')} -> {new.get('required')}")
    other = sorted(k for k in set(old) | set(new) if k != "properties" and old.get(k) != new.get(k))
    if other:
        parts.append(f"other top-level keys changed: {other}")
    return "; ".join(parts)


def test_runspec_schema_matches_the_snapshot() -> None:
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    schema = current_schema()
    assert schema == snapshot, (
        f"RunSpec.model_json_schema() differs from {SNAPSHOT.name} "
        f"({_top_level_diff(snapshot, schema)}). If the change is intended, update the "
        f"snapshot with `{UPDATE_COMMAND}` and add an entry to CHANGELOG.md (under "
        "[Unreleased]: Changed, or Removed for a breaking change)."
    )


def test_snapshot_file_is_rendered_canonically() -> None:
    # A hand-edited snapshot would compare equal yet diff noisily on the next update.
    text = SNAPSHOT.read_text(encoding="utf-8")
    assert text == _render(json.loads(text)), f"re-render it with `{UPDATE_COMMAND}`"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {UPDATE_COMMAND}")
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(_render(current_schema()), encoding="utf-8")
    print(f"wrote {SNAPSHOT}; now add a CHANGELOG.md entry for the schema change")
