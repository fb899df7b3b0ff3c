#!/usr/bin/env bash
# Build the documentation site with mkdocs --strict (any warning fails: a broken link,
# a missing anchor, a page not in the nav). Run from anywhere; uses the main .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# docs/changelog.md is the committed copy of CHANGELOG.md (tests/test_docs.py checks it).
# Locally, refresh it; in CI, a stale copy is an error, not something to paper over.
if [[ "${CI:-}" == "true" ]]; then
  cmp -s CHANGELOG.md docs/changelog.md \
    || { echo "docs/changelog.md differs from CHANGELOG.md: cp CHANGELOG.md docs/changelog.md"; exit 1; }
else
  cp CHANGELOG.md docs/changelog.md
fi
.venv/bin/pip install -q "mkdocs>=1.6,<2"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
.venv/bin/mkdocs build --strict -d "$site"
echo "docs: built $(find "$site" -name '*.html' | wc -l) HTML pages with --strict"
