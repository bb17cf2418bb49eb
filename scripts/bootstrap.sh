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
# The browser test drives Debian's chromium (playwright cannot download browsers here). Install it when
# missing and we may (root, or passwordless sudo); quiet, full log shown only on failure.
if [ ! -x /usr/bin/chromium ] && [ -z "${RAG_CLEAN_SKIP_CHROMIUM:-}" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  fi
  if [ "$SUDO" = none ]; then
    echo "[bootstrap] chromium missing and no root/sudo: the browser test will skip"
  else
    echo "[bootstrap] installing chromium (apt-get, ~1 minute; log: .venv/apt-chromium.log)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { $SUDO apt-get install -y -q --no-install-recommends chromium \
           || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium; }; } \
         > .venv/apt-chromium.log 2>&1 < /dev/null; then
      tail -30 .venv/apt-chromium.log >&2
      echo "[bootstrap] apt-get install chromium failed (full log: .venv/apt-chromium.log); the browser test will skip" >&2
    fi
  fi
fi
