"""System metrics: one background thread per Tracker samples CPU, memory, disk and GPUs into its open runs.

Every interval the probes are read once and the values are logged into every open run
through its non-blocking logger (``system/...``, or ``system/node<k>/...`` under DDP).
Nothing here raises into training: a failing probe is dropped with one warning.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainkit_tracking._core import env as _env
from trainkit_tracking._insight.context import env_flag, env_int, node_rank
from trainkit_tracking._process import hooks
from trainkit_tracking._process import rank as _rank
from trainkit_tracking.errors import TrackingError, TrackingWarning

if TYPE_CHECKING:
    from trainkit_tracking._journal.run_logger import RunLogger

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
NODE_FLUSH_TIMEOUT = 10.0  # a NoopRun's end waits at most this for its node's metrics
_MB = 1024 * 1024
INSTALL_HINT = 'pip install "trainkit-tracking[system]"'

Probe = tuple[str, Callable[[], float]]


class SampledRun(Protocol):
    """A run the sampler logs into (a Run, or the NoopRun of another rank)."""

    @property
    def id(self) -> str: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...


class LoggerSettings(Protocol):
    """Where a node leader's own logger sends (the Tracker's settings)."""

    @property
    def spool_dir(self) -> Path: ...

    @property
    def flush_interval(self) -> float: ...

    def resolve_tracking_uri(self) -> tuple[str, str]: ...


def options(
    environ: Mapping[str, str], enabled: bool | None, interval: float | None
) -> tuple[bool, float]:
    """(on, interval) from the arguments, else TRAINKIT_SYSTEM_METRICS(_INTERVAL), else off/10 s."""
    on = env_flag(environ, _env.TRAINKIT_SYSTEM_METRICS, False) if enabled is None else enabled
    if interval is None:
        name = _env.TRAINKIT_SYSTEM_METRICS_INTERVAL
        raw = environ.get(name, "").strip()
        try:
            interval = float(raw) if raw else DEFAULT_INTERVAL
        except ValueError:
            interval = -1.0
        if not (interval > 0 and math.isfinite(interval)):
            raise TrackingError(
                f"{name}={environ[name]!r} is not a number of seconds > 0; fix it or unset it"
            )
    elif isinstance(interval, bool) or not (
        isinstance(interval, (int, float)) and interval > 0 and math.isfinite(interval)
    ):
        raise ValueError(f"system_metrics_interval must be seconds > 0, got {interval!r}")
    return bool(on), float(interval)


def _import_psutil() -> Any:
    try:
        import psutil
    except ImportError as exc:
        raise ImportError(f"system metrics need psutil; install it with {INSTALL_HINT}") from exc
    return psutil


def visible_gpus(selection: str | None, count: int) -> list[int | str]:
    """The NVML devices CUDA_VISIBLE_DEVICES lets this process use, in CUDA's order.

    Indices or ``GPU-``/``MIG-`` UUIDs; like CUDA, the list ends at the first entry that
    is not a device (``-1`` or an empty value hides every GPU). Unset: every device.
    """
    if selection is None:
        return list(range(count))
    devices: list[int | str] = []
    for part in (p.strip() for p in selection.split(",")):
        if part.isdigit() and int(part) < count:
            devices.append(int(part))
        elif part.startswith(("GPU-", "MIG-")):
            devices.append(part)
        else:
            break
    return devices


def _warn(message: str) -> None:
    try:  # in the sampler thread: a warnings filter set to "error" must not kill it
        warnings.warn(message, TrackingWarning, stacklevel=2)
    except Exception:  # a filter set to "error" in the sampler thread: never raise there
        log.warning("%s", message)


@dataclass
class _Target:
    log_metrics: Callable[..., None]
    prefix: str
    logger: RunLogger | None  # our own logger for a NoopRun's run (the node leader's)
    step: int = 0


class Sampler:
    """Samples this machine every ``interval`` seconds while at least one run is open.

    The thread starts with the first run and stops after the last one ends. ``samples``
    counts the rounds taken since the sampler was made.
    """

    def __init__(self, interval: float, environ: Mapping[str, str], cwd: Path | None) -> None:
        self.interval = interval
        self._psutil = _import_psutil()
        self._environ = environ
        self._gpu_selection = environ.get(_env.CUDA_VISIBLE_DEVICES)
        self._disk_path = str(cwd or Path.cwd())
        local = env_int(environ, _env.LOCAL_RANK)
        self._local_rank = local if local is not None else env_int(environ, _env.SLURM_LOCALID)
        self._node = node_rank(environ) or 0
        self._lock = threading.Lock()
        self._targets: dict[SampledRun, _Target] = {}
        self._stop: threading.Event | None = None  # the running thread's stop signal
        self.samples = 0
        _SAMPLERS.add(self)

    def _after_fork(self) -> None:
        # The child has no sampler thread, and the parent's runs are not its to sample.
        self._lock = threading.Lock()
        self._targets = {}
        self._stop = None

    # Runs ---------------------------------------------------------------------------

    def _prefix(self) -> str:
        distributed = _rank.process_group_active() or any(
            self._environ.get(name, "").strip() for name in _env.DDP_VARS
        )
        return f"system/node{self._node}/" if distributed else "system/"

    def add(self, run: SampledRun) -> None:
        """Sample into ``run`` (a Run this process logs to) until ``remove(run)``."""
        self._add(run, _Target(run.log_metrics, self._prefix(), None))

    def add_node_leader(self, run: SampledRun, tracker: LoggerSettings) -> None:
        """On a rank other than 0: the first process of its node samples into rank 0's run.

        The first process is the one with ``LOCAL_RANK`` (else ``SLURM_LOCALID``) 0. The NoopRun logs nothing, so the node's metrics go through a logger of our own for
        that run id, without heartbeat or end (rank 0 owns the run).
        """
        if run.id is None or self._local_rank != 0:
            return  # not the first process of its node (or no run id to log into)
        from trainkit_tracking._journal.run_logger import RunLogger

        try:
            uri, _ = tracker.resolve_tracking_uri()
            logger = RunLogger(
                uri,
                run.id,
                spool_dir=tracker.spool_dir,
                flush_interval=tracker.flush_interval,
                heartbeat_interval=0.0,
            )
        except Exception as exc:  # never break the training process for its metrics
            _warn(f"system metrics of node {self._node} are off: {exc}")
            return
        self._add(run, _Target(logger.log_metrics, self._prefix(), logger))

    def _add(self, run: SampledRun, target: _Target) -> None:
        with self._lock:
            self._targets[run] = target
            if self._stop is None:
                self._stop = threading.Event()
                thread = threading.Thread(
                    target=self._loop, args=(self._stop,), name="trainkit-system", daemon=True
                )
                thread.start()

    def remove(self, run: SampledRun, timeout: float | None = None) -> bool:
        """Stop sampling into ``run``; after this returns nothing more is logged into it.

        For a node leader's run, flushes its logger (within ``timeout``, default 10 s)
        and returns whether everything was stored.
        """
        with self._lock:
            target = self._targets.pop(run, None)
            if not self._targets and self._stop is not None:
                self._stop.set()
                self._stop = None
        if target is None or target.logger is None:
            return True
        try:
            return target.logger.end(None, NODE_FLUSH_TIMEOUT if timeout is None else timeout)
        except Exception as exc:  # NoopRun.end runs in __exit__: never mask the user's error
            log.warning("could not flush the system metrics of node %s: %s", self._node, exc)
            return False

    # Sampling -----------------------------------------------------------------------

    def _loop(self, stop: threading.Event) -> None:
        probes, shutdown = self._probes()
        try:
            while not stop.wait(self.interval):
                values = self._sample(probes)
                with self._lock:
                    if stop.is_set():
                        return
                    self.samples += 1
                    for target in self._targets.values():
                        self._emit(target, values)
        except Exception as exc:  # pragma: no cover - the probes and _emit catch their own
            log.warning("system metrics stopped: %s", exc)
        finally:
            shutdown()

    @staticmethod
    def _emit(target: _Target, values: Mapping[str, float]) -> None:
        try:
            target.log_metrics({target.prefix + k: v for k, v in values.items()}, step=target.step)
        except Exception as exc:
            log.debug("logging system metrics failed: %s", exc)
        target.step += 1

    def _sample(self, probes: list[Probe]) -> dict[str, float]:
        values: dict[str, float] = {}
        for probe in list(probes):
            name, read = probe
            try:
                values[name] = float(read())
            except Exception as exc:
                probes.remove(probe)
                _warn(f"system metric {name!r} could not be read ({exc}); it is no longer logged")
        return values

    def _probes(self) -> tuple[list[Probe], Callable[[], None]]:
        psutil = self._psutil
        process = psutil.Process()
        last = [_cpu_busy_total(psutil.cpu_times())]

        def cpu_percent() -> float:
            # Our own baseline: psutil.cpu_percent(None) shares one with the user's calls.
            busy, total = _cpu_busy_total(psutil.cpu_times())
            (busy0, total0), last[0] = last[0], (busy, total)
            return 100.0 * max(0.0, busy - busy0) / (total - total0) if total > total0 else 0.0

        def memory_used_mb() -> float:
            memory = psutil.virtual_memory()
            return float(memory.total - memory.available) / _MB

        probes: list[Probe] = [
            ("cpu_percent", cpu_percent),
            ("memory_used_mb", memory_used_mb),
            ("process_rss_mb", lambda: process.memory_info().rss / _MB),
            ("disk_used_percent", lambda: psutil.disk_usage(self._disk_path).percent),
        ]
        gpu_probes, shutdown = self._gpu_probes()
        return probes + gpu_probes, shutdown

    def _gpu_probes(self) -> tuple[list[Probe], Callable[[], None]]:
        try:
            import pynvml
        except ImportError:
            log.debug("no GPU metrics: nvidia-ml-py is not installed (%s)", INSTALL_HINT)
            return [], _nothing
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # no driver, no GPU: GPU metrics are simply absent
            log.debug("no GPU metrics: NVML did not initialise: %s", exc)
            return [], _nothing

        def shutdown() -> None:
            try:
                pynvml.nvmlShutdown()
            except Exception as exc:
                log.debug("NVML shutdown: %s", exc)

        probes: list[Probe] = []
        try:
            devices = visible_gpus(self._gpu_selection, int(pynvml.nvmlDeviceGetCount()))
        except Exception as exc:
            log.debug("no GPU metrics: NVML cannot count devices: %s", exc)
            return [], shutdown
        for i, device in enumerate(devices):
            try:
                if isinstance(device, int):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(device)
                else:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(device)
            except Exception as exc:
                log.debug("no metrics for GPU %s: %s", device, exc)
                continue
            probes += _gpu_device_probes(pynvml, f"gpu{i}/", handle)
        return probes, shutdown


def _gpu_device_probes(pynvml: Any, prefix: str, handle: Any) -> list[Probe]:
    temperature = pynvml.NVML_TEMPERATURE_GPU
    return [
        (prefix + "utilization_percent", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        (prefix + "memory_used_mb", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / _MB),
        (prefix + "power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        (prefix + "temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, temperature)),
    ]


def _cpu_busy_total(times: Any) -> tuple[float, float]:
    # psutil's own accounting: guest time is already part of user/nice on Linux.
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def _nothing() -> None:
    return None


_SAMPLERS: weakref.WeakSet[Sampler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for each in list(_SAMPLERS):
        each._after_fork()


hooks.on_fork(_after_fork_in_child)


def sampler(
    environ: Mapping[str, str],
    cwd: Path | None,
    enabled: bool | None,
    interval: float | None,
) -> Sampler | None:
    """The Tracker's sampler when system metrics are on (ImportError without psutil), else None."""
    on, seconds = options(environ, enabled, interval)
    return Sampler(seconds, environ, cwd) if on else None
