#!/usr/bin/env bash
# The main job: install, then materialize every asset for a collection (default: the bundled
# "sample") on the real offline models, through the Dagster CLI and a persistent DAGSTER_HOME.
# Output: short INFO lines (rag_clean_assets/console_log.py); `--verbose` adds Dagster's DEBUG events.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--verbose" ] || [ "${1:-}" = "--debug" ]; then
  export RAG_CLEAN_LOG_LEVEL=DEBUG
  shift
fi
# RAG_CLEAN_SKIP_BOOTSTRAP=1: the environment is installed already (the test of this script's output).
[ -n "${RAG_CLEAN_SKIP_BOOTSTRAP:-}" ] || bash scripts/bootstrap.sh
COLLECTION=${1:-sample}
export DAGSTER_HOME=${DAGSTER_HOME:-$PWD/.dagster_home}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m rag_clean_assets.collections init-home
.venv/bin/python -m rag_clean_assets.collections add "$COLLECTION"
start=$(date +%s)
# The run config names the project's console logger (short lines, $RAG_CLEAN_LOG_LEVEL): without it Dagster
# logs every event at DEBUG. Dagster's "superseded by dg" warning comes before any project code loads:
# dg needs dagster-dg-cli, which pins another Dagster version (README, "UI").
PYTHONWARNINGS="ignore:Function \`asset_materialize_command\` is superseded" \
  .venv/bin/dagster asset materialize -m rag_clean_assets.definitions --select '*' --partition "$COLLECTION" \
  --config-json '{"loggers": {"console": {}}}'
end=$(date +%s)
.venv/bin/python -m rag_clean_assets.collections report "$COLLECTION" --wall-seconds $((end - start))
# One example search over the index the run just built, ranked as `reranked` measured (README "Search").
EXAMPLE_QUERY=${EXAMPLE_QUERY:-"How do I clear a stale lock left behind after a server crashed during a backup?"}
echo "example search: rag-clean search --collection $COLLECTION \"$EXAMPLE_QUERY\" -k 3"
.venv/bin/python -m rag_clean_assets.cli search --collection "$COLLECTION" "$EXAMPLE_QUERY" -k 3 \
  || echo "(example search skipped: see the error above)"
