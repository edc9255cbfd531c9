#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv with the test extra, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,lm
exec .venv/bin/python -m pytest "$@"
