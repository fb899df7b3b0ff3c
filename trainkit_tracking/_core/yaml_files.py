"""Reading a YAML config file (naming policy, tag keys) with errors that name the file."""

from __future__ import annotations

import os
from typing import Any

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
