"""Run context: who made a run, from which code, and where (what ``mlflow.start_run`` tags, and more).

Read once per Tracker: the environment when it is built (and validated there), git and
package metadata on its first run; every run it creates then reuses the same tags.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._core.tags import TagSet, _created_by
from trainkit_tracking.errors import TrackingError

log = logging.getLogger(__name__)

GIT_TIMEOUT = 2.0  # seconds; a repository that takes longer simply gets no git tags
VERSIONED_DISTS = ("mlflow", "torch", "transformers", "optuna")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# Environment variable -> logical tag name, each an integer >= 0 when set.
_WHERE_VARS = (
    (_env.SLURM_JOB_ID, "slurm_job_id"),
    (_env.SLURM_ARRAY_JOB_ID, "slurm_array_job_id"),
    (_env.SLURM_ARRAY_TASK_ID, "slurm_array_task_id"),
)


def env_flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean variable (1/0, true/false, yes/no, on/off); unset or empty: ``default``."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise TrackingError(
        f"{name}={environ[name]!r} is not a boolean; set it to 1 or 0 (or true/false, "
        "yes/no, on/off), or unset it"
    )


def env_int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    """An integer variable >= ``minimum``; None when unset or empty."""
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TrackingError(
            f"{name}={environ[name]!r} is not an integer >= {minimum}; fix it or unset it"
        )
    return number


def node_rank(environ: Mapping[str, str]) -> int | None:
    """The node's index in a multi-node job: ``GROUP_RANK`` (torchrun), else ``SLURM_NODEID``."""
    rank = env_int(environ, _env.GROUP_RANK)
    return rank if rank is not None else env_int(environ, _env.SLURM_NODEID)


def where(environ: Mapping[str, str]) -> dict[str, str]:
    """Logical tag name -> value for the scheduler and launcher variables that are set."""
    found: dict[str, str] = {}
    for name, logical in _WHERE_VARS:
        value = env_int(environ, name)
        if value is not None:
            found[logical] = str(value)
    rank = node_rank(environ)
    if rank is not None:
        found["node_rank"] = str(rank)
    world = env_int(environ, _env.WORLD_SIZE, minimum=1)
    if world is not None:
        found["world_size"] = str(world)
    return found


@dataclass(frozen=True)
class GitInfo:
    commit: str
    branch: str | None  # None on a detached HEAD
    dirty: bool  # tracked files differ from HEAD (untracked files do not count)


def git_info(cwd: Path, timeout: float = GIT_TIMEOUT) -> GitInfo | None:
    """HEAD, branch and dirtiness of the git work tree at ``cwd``; None outside one or without git.

    One ``git status`` call. GIT_OPTIONAL_LOCKS=0 keeps it from refreshing the index, so
    it never competes with the user's own git commands for the index lock.
    """
    command = ["git", "status", "--porcelain=v2", "--branch", "--untracked-files=no"]
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("no git tags: %s in %s failed: %s", " ".join(command), cwd, exc)
        return None
    if done.returncode != 0:
        log.debug("no git tags: %s is not a git work tree (%s)", cwd, done.stderr.strip())
        return None
    commit = branch = None
    dirty = False
    for line in done.stdout.splitlines():
        if line.startswith("# branch.oid "):
            commit = line[len("# branch.oid ") :].strip()
        elif line.startswith("# branch.head "):
            head = line[len("# branch.head ") :].strip()
            branch = None if head == "(detached)" else head
        elif line and not line.startswith("#"):
            dirty = True
    if not commit or commit == "(initial)":  # a repository without commits
        return None
    return GitInfo(commit, branch, dirty)


@functools.cache
def package_versions() -> dict[str, str]:
    """Installed versions of mlflow, torch, transformers and optuna, from metadata only."""
    versions = {}
    for name in VERSIONED_DISTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        versions[name] = _version(dist)
    return versions


def _version(dist: importlib.metadata.Distribution) -> str:
    # The Version header leads the metadata: scanning for it is several times faster than
    # dist.version, which parses the whole file (long READMEs included) as e-mail headers.
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    for line in text.splitlines():
        if line.startswith("Version:"):
            return line[len("Version:") :].strip()
        if not line:
            break
    return str(dist.version)


def _in_notebook() -> bool:
    """Whether this is a Jupyter kernel (IPython is only looked at when already imported)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # a broken IPython install: not a notebook we can name
        return False
    return shell is not None and (
        type(shell).__name__ == "ZMQInteractiveShell" or hasattr(shell, "kernel")
    )


def source(environ: Mapping[str, str], argv: Sequence[str]) -> tuple[str, str]:
    """(``mlflow.source.name``, ``mlflow.source.type``) as MLflow sets them.

    The name is the script (``argv[0]`` made absolute), the notebook, or ``<console>``;
    the type is ``NOTEBOOK`` in a Jupyter kernel, ``JOB`` in a batch job (Azure ML, SLURM,
    a committed Kaggle notebook), else ``LOCAL``.
    """
    batch = environ.get(_env.KAGGLE_KERNEL_RUN_TYPE, "").lower() == "batch"
    job = batch or bool(environ.get(_env.AZUREML_RUN_ID) or environ.get(_env.SLURM_JOB_ID))
    if _in_notebook():
        notebook = next((environ[n] for n in _env.NOTEBOOK_VARS if environ.get(n)), None)
        name = os.path.abspath(notebook) if notebook else "<notebook>"
        return name, "JOB" if batch else "NOTEBOOK"
    script = argv[0] if argv else ""
    name = os.path.abspath(script) if script not in ("", "-c", "-") else "<console>"
    return name, "JOB" if job else "LOCAL"


_MLFLOW_CONTEXT = ("mlflow_user", "source_name", "source_type", "git_commit")


def keep_mlflow_tags(tags: TagSet, existing: Mapping[str, str], keys: TagKeys) -> TagSet:
    """``tags`` without the MLflow context tags ``existing`` already has.

    For a run made by someone else (an Azure ML job's run): its user and source stay.
    """
    taken = {keys[name] for name in _MLFLOW_CONTEXT} & set(existing)
    return TagSet({k: v for k, v in tags.items() if k not in taken}) if taken else tags


class RunContext:
    """The context tags of one Tracker.

    The environment is read and validated when it is made (a malformed ``SLURM_*``,
    ``GROUP_RANK`` or ``WORLD_SIZE`` is a ``TrackingError`` then); git and package
    metadata are read on the first ``tags()`` call and cached; a forked child
    recomputes only its pid.
    """

    def __init__(
        self,
        environ: Mapping[str, str],
        cwd: Path | None,
        *,
        enabled: bool | None = None,
        git: bool | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.enabled = (
            env_flag(environ, _env.TRAINKIT_CONTEXT, True) if enabled is None else enabled
        )
        self.git = env_flag(environ, _env.TRAINKIT_CONTEXT_GIT, True) if git is None else git
        self._environ = environ
        self._cwd = cwd
        self._argv = tuple(sys.argv if argv is None else argv)
        self._where = where(environ)
        self._git: GitInfo | None = None
        self._git_read = False
        self._cached: tuple[int, TagKeys, TagSet] | None = None

    def git_info(self) -> GitInfo | None:
        if not self._git_read:
            self._git = git_info(self._cwd or Path.cwd()) if self.git else None
            self._git_read = True
        return self._git

    def tags(self, keys: TagKeys) -> TagSet:
        """Every context tag, for a run created now by this process."""
        pid = os.getpid()
        cached = self._cached
        if cached is not None and cached[0] == pid and cached[1] is keys:
            return cached[2]
        tags = TagSet(self._values(keys, pid)) if self.enabled else TagSet()
        self._cached = (pid, keys, tags)
        return tags

    def _values(self, keys: TagKeys, pid: int) -> dict[str, str]:
        name, kind = source(self._environ, self._argv)
        values = {
            keys["mlflow_user"]: _created_by(self._environ),
            keys["source_name"]: name,
            keys["source_type"]: kind,
            keys["python_version"]: platform.python_version(),
            keys["host"]: socket.gethostname(),
            keys["pid"]: str(pid),
        }
        git = self.git_info()
        if git is not None:
            values[keys["git_commit"]] = git.commit
            values[keys["git_dirty"]] = "true" if git.dirty else "false"
            if git.branch is not None:
                values[keys["git_branch"]] = git.branch
        for dist, version in package_versions().items():
            values[keys[f"versions_{dist}"]] = version
        for logical, value in self._where.items():
            values[keys[logical]] = value
        return values
