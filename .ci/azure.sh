#!/usr/bin/env bash
# The azure extra in its own venv (.venv-azure), at the low end of the declared mlflow range.
# Why mlflow 3.15.0 + azureml-mlflow 1.62 (and not 3.17.2 + 1.60.0): docs/azure.md, "Versions".
# Called by .ci/run from the repo root; the main venv covers the high end (mlflow 3.17.2).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_DISABLE_TELEMETRY=true PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# azureml-mlflow 1.62 requires mlflow-skinny<=3.15.0, and mlflow 3.15.N pins mlflow-skinny==3.15.N,
# so 3.15.0 is the one 3.15 release that fits. Everything goes in ONE pip call: installing
# azureml-mlflow after mlflow would silently downgrade mlflow-skinny and leave mlflow mismatched.
MLFLOW_LOW=3.15.0

"$PY" -m venv .venv-azure
.venv-azure/bin/pip install -q -U pip
.venv-azure/bin/pip install -q -e ".[dev,azure]" \
  "mlflow==${MLFLOW_LOW}" "mlflow-skinny==${MLFLOW_LOW}" "azureml-mlflow>=1.62"
.venv-azure/bin/pip check

.venv-azure/bin/python - "$MLFLOW_LOW" <<'EOF'
import sys
from importlib.metadata import version

found = {name: version(name) for name in ("mlflow", "mlflow-skinny", "azureml-mlflow")}
print(" ".join(f"{name} {v}" for name, v in found.items()), "python", sys.version.split()[0])
if not found["mlflow"] == found["mlflow-skinny"] == sys.argv[1]:
    sys.exit(f"mlflow and mlflow-skinny must both be {sys.argv[1]}: {found}")
EOF

# The Azure tests, and the core tracker tests again on this mlflow and with azureml-mlflow's
# plugins loaded (mlflow imports them through entry points for every store); the bulk
# inserts into MLflow's tables against this mlflow's own log_batch (SPEC section 17).
.venv-azure/bin/python -m pytest tests/test_azure.py tests/test_tracker.py tests/test_handover.py \
  tests/test_sql_bulk.py
