#!/usr/bin/env bash
# Provision a running box after editing config.yml (e.g. from a Jupyter terminal), without stopping
# the services: models are added in place, and ComfyUI is restarted only when nodes changed, once
# the jobs it is running (and those waiting in its queue) are done.
#   apply_config.sh [--dry-run] [--force] [--update] [--prune] [--no-restart | --now] [--max-wait SECONDS]
#     --dry-run           list what would change (each model, each node old -> new, the restart), change nothing
#     --force             ignore the gate: check every entry again; nodes are resolved and checked out again
#     --update            move latest, nightly and branch nodes, and ComfyUI at ref latest, to what they name now
#     --prune             remove the model files no config entry names any more (listed on every run)
#     --no-restart        never restart ComfyUI (say that nodes changed instead; the restart stays due)
#     --now               restart ComfyUI at once, without waiting for its jobs (the running job fails)
#     --max-wait SECONDS  wait at most this long for ComfyUI's jobs before restarting it (default 900);
#                         past it ComfyUI is not restarted (exit 1) and the next apply_config.sh restarts it
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/project_python.sh
source "$HERE/scripts/project_python.sh"
project_python "$HERE" # PY: $PYTHON, else $VENV, the repo's .venv, /opt/venv (the image), python3
cd "$HERE"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

args=(--apply)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force | --dry-run | --no-restart | --now | --update | --prune) args+=("$1") ;;
    --max-wait)
      if [[ $# -lt 2 ]]; then
        echo "apply_config.sh: --max-wait needs a number of seconds (e.g. --max-wait 600)" >&2
        exit 2
      fi
      args+=(--max-wait "$2")
      shift
      ;;
    --max-wait=*) args+=("$1") ;;
    -h | --help)
      sed -n '2,13s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "apply_config.sh: unknown argument '$1' (expected --dry-run, --force, --update, --prune, --no-restart, --now, --max-wait SECONDS)" >&2
      exit 2
      ;;
  esac
  shift
done
exec "$PY" -m comfy_worker.provision "${args[@]}"
