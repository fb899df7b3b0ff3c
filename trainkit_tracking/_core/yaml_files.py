"""Reading a YAML config file (naming policy, tag keys) with errors that name the file, and
the hint for a file that is not there."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainkit_tracking._core.suggest import close_names
from trainkit_tracking.errors import TrackingError


def load_config(
    path: str | os.PathLike[str], where: str, error: type[TrackingError], shape: str
) -> Any:
    """The YAML document of ``path``; ``error(...)`` naming ``where`` when the file is not
    UTF-8, not YAML, or nested too deeply (``shape`` says what it should look like)."""
    import yaml  # pyyaml is a core dependency; imported here to keep the package import cheap

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as e:
        raise error(
            f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {e}") from e
    except RecursionError as e:
        raise error(f"{where} is nested too deeply to be read; {shape}") from e


def missing_file_hint(path: str | os.PathLike[str], extra: Iterable[str] = ()) -> str | None:
    """None when ``path`` is a file; else why not, with the close names in its folder (and
    among ``extra``, such as preset names): ``"file 'nameing.yaml' does not exist; did you
    mean 'naming.yaml'? "``, to be followed by what to do."""
    given = os.fspath(path)
    target = Path(given).expanduser()
    if target.is_file():
        return None
    if target.is_dir():
        return f"{given!r} is a folder, not a file; "
    head = os.path.dirname(given)
    try:
        siblings = [p.name for p in target.parent.iterdir() if p.is_file()]
    except OSError:  # no such folder either: only the extra names can be close
        siblings = []
    close = close_names(target.name, [*siblings, *extra], n=2)
    shown = [repr(os.path.join(head, c) if c in siblings else c) for c in close]
    hint = f"did you mean {' or '.join(shown)}? " if shown else ""
    return f"file {given!r} does not exist; {hint}"
