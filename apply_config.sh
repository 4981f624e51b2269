#!/usr/bin/env bash
# Provision a running box after editing config.yml (e.g. from a Jupyter terminal), without stopping
# the services: models are added in place, and ComfyUI is restarted only when nodes changed.
#   apply_config.sh [--force] [--dry-run] [--no-restart]
#     --force       ignore the gate: check every entry again
#     --dry-run     say what would happen, change nothing
#     --no-restart  never restart ComfyUI (say that nodes changed instead)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/project_python.sh
source "$HERE/scripts/project_python.sh"
project_python "$HERE" # PY: $PYTHON, else $VENV, the repo's .venv, /opt/venv (the image), python3
cd "$HERE"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

args=(--apply)
for arg in "$@"; do
  case "$arg" in
    --force | --dry-run | --no-restart) args+=("$arg") ;;
    -h | --help)
      sed -n '2,7p' "$0"
      exit 0
      ;;
    *)
      echo "apply_config.sh: unknown argument '$arg' (expected --force, --dry-run, --no-restart)" >&2
      exit 2
      ;;
  esac
done
exec "$PY" -m comfy_worker.provision "${args[@]}"
