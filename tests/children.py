"""Python subprocesses for the tests that need a process of their own (a writer killed, a
fork, an exit status), and the steps of a metric a store holds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from trainkit_tracking._store.store import Store


def python(
    code: str, *args: str, env: dict[str, str] | None = None, stdin: bool = False
) -> subprocess.Popen[str]:
    """``python -c code args...`` with the suite's environment (plus ``env``), unbuffered;
    stdout and stderr piped, and stdin too with ``stdin=True``."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def steps(store: Store, run_id: str, key: str) -> list[int]:
    """The steps of metric ``key`` of the run, sorted."""
    return sorted(m.step for m in store.client.get_metric_history(run_id, key))
