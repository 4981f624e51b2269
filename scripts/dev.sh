#!/usr/bin/env bash
# Sets up the dev environment and runs the worker locally: ComfyUI (CPU when there is no GPU), the
# RunPod SDK's local API on API_PORT (8000) serving handler.py, and JupyterLab on JUPYTER_PORT (8888).
# ComfyUI is cloned into $VOLUME_ROOT/ComfyUI (default ./workspace) from COMFYUI_REPO at the config's
# ref, and the models and nodes of config.yml are provisioned first. Ctrl-C stops everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
# Paths, ports and files come from the one settings module (comfy_worker/settings.py), never computed here.
exports="$("$PY" -m comfy_worker.settings --export)"
eval "$exports"
REPO="$("$PY" -c 'from comfy_worker.settings import Settings; print(Settings.from_env().comfyui_repo)')"
CONFIG="${CONFIG:-$ROOT/config.yml}"

"$PY" download_models.py --validate-only --config "$CONFIG"
REF="$("$PY" -c '
import sys
from comfy_worker.config_schema import load_config
from comfy_worker.settings import Settings
print(Settings.from_env().effective_comfyui_ref(load_config(sys.argv[1]).comfyui_ref()))' "$CONFIG")"
mkdir -p "$VOLUME_ROOT"
if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
  echo "[dev] cloning ComfyUI $REF from $REPO into $COMFYUI_PATH"
  git clone -q "$REPO" "$COMFYUI_PATH.partial"
  git -C "$COMFYUI_PATH.partial" -c advice.detachedHead=false checkout -q "$REF"
  mv "$COMFYUI_PATH.partial" "$COMFYUI_PATH"
fi
"$PY" download_models.py --config "$CONFIG" || echo "[dev] WARNING: some models failed (see above)"
"$PY" install_nodes.py --config "$CONFIG" || echo "[dev] WARNING: some nodes failed (see above)"

comfy_args=(--listen 127.0.0.1 --port "$COMFY_PORT")
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[dev] WARNING: no CUDA device: ComfyUI runs on the CPU (slow)"
  comfy_args+=(--cpu)
fi
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait || true; }
trap cleanup EXIT INT TERM
(cd "$COMFYUI_PATH" && exec "$PY" main.py "${comfy_args[@]}") > >(tee "$COMFY_LOG_FILE") 2>&1 &
pids+=($!)
echo "$!" >"$COMFY_PID_FILE"
"$PY" handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port "$API_PORT" &
pids+=($!)
jupyter_args=(--no-browser --ip 127.0.0.1 --port "$JUPYTER_PORT" --notebook-dir "$ROOT")
[[ "$(id -u)" == 0 ]] && jupyter_args+=(--allow-root)
# The password reaches Jupyter through its own env var, never the command line (visible in ps).
JUPYTER_TOKEN="${JUPYTER_PASSWORD:-${JUPYTER_TOKEN:-}}" "$PY" -m jupyterlab "${jupyter_args[@]}" &
pids+=($!)
echo "[dev] ComfyUI http://127.0.0.1:$COMFY_PORT  API http://127.0.0.1:$API_PORT/docs  Jupyter http://127.0.0.1:$JUPYTER_PORT"
wait -n || true
echo "[dev] a service stopped; shutting down the others" >&2
