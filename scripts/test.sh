#!/usr/bin/env bash
# The README's test command: set up (if needed), lint, run the test suite.
# Default: everything but the `slow` marker (about 4 minutes on 2 cores); `bash scripts/test.sh -m slow`
# runs the slow suites, `bash scripts/test.sh -m ''` everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
.venv/bin/python -m pytest -n 2 -q "$@"
