#!/usr/bin/env bash
# Create .venv (if missing) and install the project with pinned CPU torch. Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.rag_clean_installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing dependencies (pinned CPU torch; ~2 minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # constraints.txt pins the CPU torch build: an unpinned torch would pull a multi-GB CUDA build.
  # The full pip log goes to .venv/install.log; it is shown only when the install fails.
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]" \
      > .venv/install.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/install.log | tail -40 >&2
    echo "[bootstrap] pip install failed (full log: .venv/install.log)" >&2
    exit 1
  fi
  # dagster-k8s pins dagster 1.13.27 (no release for 1.13.28): its deps come from the extra, it comes alone.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps dagster-k8s==0.29.27 \
    >> .venv/install.log 2>&1 || { tail -20 .venv/install.log >&2; echo "[bootstrap] dagster-k8s install failed" >&2; exit 1; }
  .venv/bin/python -c "import dagster, torch, sentence_transformers, FlagEmbedding, rag_clean_assets" \
    || { echo "[bootstrap] installed packages do not import" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
