#!/usr/bin/env bash
# The test command: install (incl. test tools), then run pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two workers, each taking whole test files (module fixtures are built once); the suite waits on
# subprocesses and servers often enough that 2 workers on 2 cores finish sooner. `-n 0` in the args runs serially.
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
