"""Which service's limits a store keeps to (SPEC section 19): Azure ML's tracking service
is stricter than MLflow's, and every call to it is cut to fit here, once."""

from __future__ import annotations

from trainkit_tracking._core import limits
from trainkit_tracking._core.env import store_flavor


class ServiceLimits:
    """The limits of the store at ``tracking_uri`` (a mixin of ``Store``)."""

    tracking_uri: str

    @property
    def flavor(self) -> str:
        """``azureml`` for an Azure ML workspace (or ``TRAINKIT_STORE_FLAVOR=azureml``), else
        ``mlflow``: which service limits every call keeps to."""
        if not hasattr(self, "_flavor"):
            self._flavor = store_flavor(self.tracking_uri)
        return self._flavor

    @property
    def page_size(self) -> int:
        """Results asked for per search page (Azure ML refuses pages of 1000 or more)."""
        return limits.AZURE_PAGE if self.flavor == "azureml" else limits.MAX_PAGE

    @property
    def metrics_per_request(self) -> int:
        """Metric values sent per log-batch request (Azure ML takes at most 250)."""
        return limits.AZURE_MAX_METRICS if self.flavor == "azureml" else limits.MAX_METRICS

    @property
    def params_per_run(self) -> int | None:
        """The most params one run may hold (Azure ML: 200; MLflow: no limit)."""
        return limits.AZURE_MAX_PARAMS_PER_RUN if self.flavor == "azureml" else None
