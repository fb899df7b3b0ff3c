#!/usr/bin/env bash
# The consumer workflow: build the wheel and sdist, install the wheel with the exact pin of
# tests/consumer/requirements.txt into a fresh venv outside the checkout, and run the
# consumer's tests from a copy (so the checkout is never on sys.path).
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$PWD"
export MLFLOW_DISABLE_TELEMETRY=true PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dist="$work/dist"

.venv/bin/python -m build --outdir "$dist" . >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; exit 1; }
shopt -s nullglob
wheels=("$dist"/trainkit_tracking-*.whl)
sdists=("$dist"/trainkit_tracking-*.tar.gz)
[[ ${#wheels[@]} -eq 1 && ${#sdists[@]} -eq 1 ]] \
  || { echo "expected one wheel and one sdist in $dist, got: $(ls "$dist")"; exit 1; }
echo "built: $(basename "${wheels[0]}") $(basename "${sdists[0]}")"

# The sdist must carry what a downstream packager needs.
sdist_root="$(basename "${sdists[0]}" .tar.gz)"
listing="$(tar -tzf "${sdists[0]}")"
for member in trainkit_tracking/py.typed CHANGELOG.md README.md pyproject.toml; do
  grep -qx "$sdist_root/$member" <<<"$listing" || { echo "sdist lacks $member"; exit 1; }
done
wheel_listing="$("$PY" -m zipfile -l "${wheels[0]}")"
grep -q "trainkit_tracking/py.typed" <<<"$wheel_listing" || { echo "wheel lacks py.typed"; exit 1; }

"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q -U pip
# The wheel file and the pin together: pip refuses if the built version is not the pinned one.
"$work/venv/bin/pip" install -q "${wheels[0]}" -r tests/consumer/requirements.txt pytest

cp -r tests/consumer "$work/consumer"
cd "$work/consumer"
# No PYTHONPATH from the caller: nothing may lead back to the checkout.
env -u PYTHONPATH TRAINKIT_CHECKOUT="$checkout" "$work/venv/bin/python" -m pytest -q
