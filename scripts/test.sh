#!/usr/bin/env bash
# Sets up everything (idempotently) and runs the whole test suite: lint, format check, shellcheck,
# hadolint (Dockerfile), pytest. Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" for a quick subset).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
VENV="${VENV:-$ROOT/.venv}"
echo "[test] ruff check"
"$VENV/bin/ruff" check .
echo "[test] ruff format --check"
"$VENV/bin/ruff" format --check .
echo "[test] shellcheck"
mapfile -t shell_files < <(git ls-files -co --exclude-standard '*.sh' .ci/run)
"$VENV/bin/shellcheck" "${shell_files[@]}"
echo "[test] hadolint"
"$VENV/bin/hadolint" Dockerfile
echo "[test] pytest"
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$rc"
