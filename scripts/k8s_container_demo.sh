#!/usr/bin/env bash
# The cluster path with real containers (opt-in, slow; not run in CI): build the user-code image of
# deploy/Dockerfile from a local Debian base (deploy/build_local_image.sh, skipped when the image exists),
# then run tests/e2e/test_k8s_executor.py with the Kubernetes API stand-in starting every step pod as a
# podman container of that image. What it shows:
#   - the sample collection's whole graph materialized by k8s_job_executor, one container per step,
#     every asset file byte-identical to an in-process run;
#   - GPU steps' pods carry nvidia.com/gpu and deploy/pods.toml's [gpu_pod] (the GPU itself is not granted);
#   - a step whose pod memory limit is 64Mi (podman --memory) is OOM-killed, exits 137, and the run fails
#     with the executor's "Discovered failed Kubernetes job ..." message; the previous file stays; a rerun succeeds.
#
#   scripts/k8s_container_demo.sh            # REBUILD=1 to rebuild the image first
#
# Needs root, podman + runc (+ debootstrap for the base; apt-get install -y debootstrap podman runc), the project's venv (.venv) with dagster-k8s.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RAG_CLEAN_K8S_STANDIN_IMAGE="${RAG_CLEAN_K8S_STANDIN_IMAGE:-localhost/rag-clean:local}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

if [[ "${REBUILD:-0}" == 1 ]] || ! podman --runtime runc image exists "$RAG_CLEAN_K8S_STANDIN_IMAGE"; then
  t0=$(date +%s)
  IMAGE="$RAG_CLEAN_K8S_STANDIN_IMAGE" "$REPO/deploy/build_local_image.sh"
  echo "== image build: $(( $(date +%s) - t0 )) s"
fi

cd "$REPO"
t0=$(date +%s)
# Its own --basetemp: pytest prunes /tmp/pytest-of-$USER to the 3 newest runs, so a concurrent pytest
# elsewhere on the machine would delete this run's folders (the pods' mounts) under it.
RAG_CLEAN_K8S_STANDIN_RUNTIME=podman PYTHONPATH="$REPO" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  "$PYTHON" -m pytest -q -s -p no:cacheprovider --basetemp="${WORK:-/var/tmp/rag_clean-k8s}/pytest" \
  tests/e2e/test_k8s_executor.py
echo "== container run of the e2e module: $(( $(date +%s) - t0 )) s"
