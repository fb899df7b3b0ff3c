"""What ``log_artifact``, ``log_artifacts``, ``log_dict`` and ``log_text`` hand to the
journal: the content as it is at the call, captured under the spool dir, so that deleting
or rewriting the file afterwards changes nothing (SPEC section 16).

Files up to ``LINK_ABOVE`` bytes are copied (as cheap as a link, and safe against a file
rewritten in place); larger ones are hard-linked where the file system allows (the
training loop must not wait for a checkpoint to be copied), else copied. A hard-linked
file rewritten in place (the same inode) before its upload changes what is uploaded:
docs/logging.md says so.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainkit_tracking._core.redact import MASK, is_secret_key, redact_value
from trainkit_tracking._journal.spool import BLOB_DIR, private_dir

LINK_ABOVE = 16 * 1024 * 1024


def _blob_dir(spool_dir: Path) -> Path:
    """A new private directory for one capture: under the spool, else a temporary one."""
    try:
        root = private_dir(spool_dir / BLOB_DIR)
        path = root / secrets.token_hex(8)
        path.mkdir(mode=0o700)
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix="trainkit-blob-"))


def _link_or_copy(src: str, dst: str) -> str:
    if os.path.getsize(src) > LINK_ABOVE:
        try:
            os.link(src, dst)
            return dst
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)
    return dst


def capture_file(spool_dir: Path, src: Path) -> Path:
    """The content of file ``src`` now, kept under the spool; raises ``OSError`` when it
    cannot be read."""
    target = _blob_dir(spool_dir) / src.name
    _link_or_copy(str(src), str(target))
    return target


def capture_tree(spool_dir: Path, src: Path) -> Path:
    """The content of directory ``src`` now (every file in it), kept under the spool."""
    target = _blob_dir(spool_dir) / (src.name or "artifacts")
    shutil.copytree(src, target, copy_function=_link_or_copy, symlinks=False)
    return target


def write_text(spool_dir: Path, name: str, text: str) -> Path:
    """A file the SDK writes itself (``log_dict``, ``log_text``), private to this user."""
    target = _blob_dir(spool_dir) / name
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return target


def masked(obj: Any, key: str | None = None) -> Any:
    """``obj`` with the value of every secret-looking key masked (``hf_token``,
    ``password``...) and credentials in strings masked, at any depth (SPEC section 8)."""
    if key is not None and is_secret_key(key) and obj is not None:
        return MASK
    if isinstance(obj, Mapping):
        return {k: masked(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [masked(v) for v in obj]
    if isinstance(obj, str):
        return redact_value(obj)
    return obj
