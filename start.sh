#!/usr/bin/env bash
# The worker's entry point (docs/architecture.md, "The flow of a start"): provisions the volume
# (config source, ComfyUI, models, nodes, the gate) and then runs the services of the mode.
#   start.sh                   provision, then run the services (ComfyUI, handler, Jupyter)
#   start.sh --provision-only  provision and exit (0 = every required entry is ready)
# Decisions live in comfy_worker/provision.py and comfy_worker/services.py; this file only orchestrates.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/project_python.sh
source "$HERE/scripts/project_python.sh"
project_python "$HERE" # PY: $PYTHON, else $VENV, the repo's .venv, /opt/venv (the image), python3
cd "$HERE"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

provision_only=0
for arg in "$@"; do
  case "$arg" in
    --provision-only) provision_only=1 ;;
    -h | --help)
      sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "start.sh: unknown argument '$arg' (expected --provision-only)" >&2
      exit 2
      ;;
  esac
done

# Paths, ports, files and the mode come from the one settings module, never computed here.
exports="$("$PY" -m comfy_worker.settings --export)"
eval "$exports"

# Provisioning runs as a child this script waits for, so that a SIGTERM (or Ctrl-C) to this script
# alone, not only to its whole process group as tini -g sends it, is passed on: provisioning stops
# within seconds (downloads keep their .part, no further phase, no gate) and this script ends after it,
# never leaving it running on its own. A trapped signal ends `wait` early: it is called again until
# the child is gone, then once more for its exit status.
stopping=0
provision_pid=""
trap 'stopping=1; [[ -z "$provision_pid" ]] || kill -TERM "$provision_pid" 2>/dev/null || true' TERM INT
"$PY" -m comfy_worker.provision &
provision_pid=$!
[[ "$stopping" == 0 ]] || kill -TERM "$provision_pid" 2>/dev/null || true # a signal before the line above
while kill -0 "$provision_pid" 2>/dev/null; do
  wait "$provision_pid" || true
done
rc=0
wait "$provision_pid" || rc=$?
trap - TERM INT
if [[ "$stopping" == 1 ]]; then
  echo "[start] stopped during provisioning (exit $rc)" >&2
  exit "$((rc == 0 ? 143 : rc))"
fi
if [[ "$provision_only" == 1 ]]; then
  exit "$rc"
fi
if [[ "$rc" == 2 ]]; then
  echo "[start] the config or an environment variable is invalid (see above): not starting" >&2
  exit 2
fi
if [[ "$rc" != 0 ]]; then
  if [[ "$MODE" == serverless ]]; then
    echo "[start] provisioning failed in serverless mode: this worker takes no jobs half-provisioned" >&2
    exit "$rc"
  fi
  if [[ ! -f "$COMFYUI_PATH/main.py" ]]; then
    echo "[start] ComfyUI is not on the volume ($COMFYUI_PATH): its clone failed (see above), so no service starts; check the network, or point COMFYUI_REPO (and COMFYUI_REF) at a repository this machine reaches" >&2
    exit "$rc"
  fi
  echo "[start] WARNING: provisioning is incomplete (see the summary above); the services start anyway:" >&2
  echo "[start] WARNING: fix config.yml (e.g. in Jupyter), then run apply_config.sh" >&2
fi
: "${JUPYTER_AUTH:=token}"
if [[ "$JUPYTER_AUTH" == none && "$MODE" == pod ]]; then
  echo "[start] WARNING: JUPYTER_AUTH=none: JupyterLab on 0.0.0.0:$JUPYTER_PORT answers anyone who reaches the pod" >&2
fi
exec "$PY" -m comfy_worker.services
