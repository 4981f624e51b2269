#!/usr/bin/env bash
# Sets up the dev environment and runs the worker locally through start.sh in local mode: ComfyUI
# (CPU when there is no GPU), the worker's API (python -m comfy_worker.api) on API_PORT (8000), and
# JupyterLab on JUPYTER_PORT (8888), after provisioning config.yml into $VOLUME_ROOT (default
# ./workspace). Extra arguments go to start.sh (e.g. --provision-only). Ctrl-C stops everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${VENV:-$ROOT/.venv}" # setup_env.sh made (or found) it there
export MODE=local PYTHON="$VENV/bin/python"
echo "[dev] starting start.sh in $MODE mode with $PYTHON"
exec bash "$ROOT/start.sh" "$@"
