# shellcheck shell=bash
# Sourced by start.sh, apply_config.sh and scripts/dev.sh: sets PY to the interpreter that has the
# project's packages, so every command runs as printed on a local box as in the image. In order:
# $PYTHON (a path or a command name), $VENV/bin/python, the repo's .venv, the image's /opt/venv,
# then python3 or python on PATH when it has the project's packages (else an error saying how to get
# one). Usage: project_python <the repo's root>.
# shellcheck disable=SC2034 # PY is read by the script that sources this file
project_python() {
  local root="$1" candidate
  if [[ -n "${PYTHON:-}" ]]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
      echo "PYTHON=$PYTHON is not an executable Python: unset PYTHON, or point it at your virtualenv's bin/python" >&2
      return 1
    fi
    PY="$PYTHON"
    return 0
  fi
  for candidate in "${VENV:+$VENV/bin/python}" "$root/.venv/bin/python" /opt/venv/bin/python; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      PY="$candidate"
      return 0
    fi
  done
  local lacks=""
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then
      # a Python on PATH is often the system's: used only when it has the project's packages
      if lacks="$("$candidate" -c 'import filelock, pydantic, yaml' 2>&1)"; then
        PY="$candidate"
        return 0
      fi
      lacks="$(command -v "$candidate") lacks the project's packages (${lacks##*$'\n'})"
      break
    fi
  done
  echo "no Python with the project's packages found${lacks:+: $lacks}: run ./scripts/setup_env.sh (it creates .venv), or set PYTHON or VENV to a Python or virtualenv that has requirements.txt installed" >&2
  return 1
}
