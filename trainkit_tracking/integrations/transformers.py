"""A Hugging Face ``TrainerCallback`` that logs a Trainer's metrics, arguments and model to a Run.

Pass ``report_to="none"`` in ``TrainingArguments`` so that Hugging Face's own
``MLflowCallback`` does not log the same metrics a second time (into whatever run
MLflow's fluent API considers active).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "trainkit_tracking.integrations.transformers needs transformers and accelerate; "
        'install them with pip install "trainkit-tracking[transformers]"'
    ) from exc

from trainkit_tracking import ParamConflictError, Run, TrackingWarning

__all__ = ["TrackingCallback"]

log = logging.getLogger(__name__)


def _param_value(value: Any) -> Any:
    # Mappings (fsdp_config, id2label) are flattened by log_params; a value too long for
    # MLflow is cut there, with the one warning every cut value gets.
    if isinstance(value, Mapping):
        return {str(k): _param_value(v) for k, v in value.items() if v is not None}
    return value


def _params(source: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{key}": _param_value(v) for key, v in source.items() if v is not None}


def _metric(value: Any) -> float | None:
    """A loggable float, or None for what the Trainer logs that is not a number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            try:
                value = value.item()  # a numpy or torch scalar
            except (TypeError, ValueError):
                return None
            return _metric(value)
        return None
    return float(value)


class TrackingCallback(TrainerCallback):
    """Log a ``transformers.Trainer`` into ``run``: metrics, parameters, optionally the model.

    - Metrics: every ``Trainer.log`` call (training loss, learning rate, ``eval_*``,
      runtime figures) is logged with ``state.global_step`` as the step; values that
      are not numbers are skipped.
    - Parameters (``params=True``): ``TrainingArguments`` (keys as given, prefixed with
      ``args_prefix``) and the model config (prefixed with ``config_prefix``) are logged
      once, on the first ``on_train_begin``; ``None`` values are skipped; the Run cuts long
      values to MLflow's 6000 characters (with a warning) and redacts secrets (``hub_token``...).
    - ``log_model=True``: at the end of training the final model (and the tokenizer or
      processor the Trainer holds) is saved with ``save_pretrained`` and uploaded under
      ``model/``. ``log_checkpoints=True``: every checkpoint the Trainer saves is
      uploaded under ``checkpoints/checkpoint-<step>`` (the callback waits for the upload,
      so that checkpoint rotation cannot delete files before they are sent).
    - Only the world process zero logs (``state.is_world_process_zero``); under DDP the
      other ranks hold a no-op run anyway.

    Use ``report_to="none"`` in ``TrainingArguments``: otherwise Hugging Face's own
    ``MLflowCallback`` logs the same metrics again, through MLflow's fluent API.
    """

    def __init__(
        self,
        run: Run,
        *,
        log_model: bool = False,
        log_checkpoints: bool = False,
        params: bool = True,
        args_prefix: str = "",
        config_prefix: str = "model_config.",
        flush_timeout: float | None = 600.0,
    ) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"TrackingCallback needs a trainkit_tracking Run, got {run!r}")
        self.run = run
        self.log_model = log_model
        self.log_checkpoints = log_checkpoints
        self.params = params
        self.args_prefix = args_prefix
        self.config_prefix = config_prefix
        self.flush_timeout = flush_timeout
        self._params_logged = False

    # Trainer events ----------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        if "mlflow" in report_to or "all" in report_to:
            warnings.warn(
                f"TrainingArguments.report_to={args.report_to!r} also enables Hugging Face's "
                "MLflowCallback, which logs these metrics a second time; pass "
                'report_to="none" when using TrackingCallback',
                TrackingWarning,
                stacklevel=2,
            )
        if self.params and not self._params_logged:
            self._params_logged = True
            arguments: Any = args  # to_dict is untyped upstream
            params = _params(arguments.to_dict(), self.args_prefix)
            config = getattr(model, "config", None)
            if config is not None:
                raw = config if isinstance(config, Mapping) else config.to_dict()
                params.update(_params(raw, self.config_prefix))
            try:
                self.run.log_params(params)
            except ParamConflictError as exc:
                # A second Trainer on the same run (a resumed or continued training)
                # must not stop training over a changed argument such as output_dir.
                log.warning("some Trainer params were not logged to run %s: %s", self.run.id, exc)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics: dict[str, float] = {}
        for key, value in logs.items():
            number = _metric(value)
            if number is not None and not (key == "total_flos" and math.isinf(number)):
                metrics[key] = number
        if metrics:
            self.run.log_metrics(metrics, step=int(state.global_step))

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not (self.log_checkpoints and state.is_world_process_zero):
            return
        name = f"checkpoint-{state.global_step}"
        path = os.path.join(args.output_dir or "", name)
        if not os.path.isdir(path):
            log.warning("checkpoint %s not found; not uploaded to run %s", path, self.run.id)
            return
        self.run.log_artifacts(path, artifact_path=f"checkpoints/{name}")
        self._wait_for_uploads(path)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        if self.log_model and model is not None:
            with tempfile.TemporaryDirectory(prefix="trainkit-model-") as tmp:
                unwrapped = getattr(model, "module", model)  # DDP/accelerate wrappers
                unwrapped.save_pretrained(tmp)
                if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                    processing_class.save_pretrained(tmp)
                self.run.log_artifacts(tmp, artifact_path="model")
                # The upload reads the files in the background: wait before they vanish.
                self._wait_for_uploads(tmp)
        else:
            self.run.flush(self.flush_timeout)

    def _wait_for_uploads(self, path: str) -> None:
        if not self.run.flush(self.flush_timeout):
            log.warning(
                "upload of %s to run %s did not finish within %ss; it stays queued",
                path,
                self.run.id,
                self.flush_timeout,
            )
