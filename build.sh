#!/usr/bin/env bash
# Builds the worker image from this folder's Dockerfile, always for linux/amd64 (docs/image-reference.md).
#   ./build.sh [-t IMAGE] [--push] [--no-cache] [--build-arg NAME=VALUE]... [--secret SPEC]...
#              [--bake] [--sizes] [--dry-run] [-- ENGINE-BUILD-ARGS...]
#   -t IMAGE          the image name (default comfy-worker:latest; --push needs a registry in it)
#   --push            push IMAGE after the build
#   --no-cache        build every layer again
#   --build-arg N=V   passed to the build (BASE_IMAGE, TORCH_INDEX_URL, TORCH_PACKAGES, COMFYUI_REF, ...)
#   --secret SPEC     passed to the build (id=NAME,src=FILE)
#   --bake            BAKE=1: provision config.yml into the image; HF_TOKEN, CIVITAI_TOKEN and
#                     GITHUB_TOKEN from this environment go in as build secrets, never build args
#   --sizes           after the build, print the size of every layer of IMAGE (oldest first) and the
#                     total (the engine's history, through python3 -m comfy_worker.image_layers)
#   --dry-run         print the commands instead of running them
# CONTAINER_ENGINE picks the engine: docker (default) or podman (which gets --format docker, the
# image format that keeps HEALTHCHECK and SHELL).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENGINE="${CONTAINER_ENGINE:-docker}"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() {
  echo "build.sh: $*" >&2
  exit 2
}

image="comfy-worker:latest"
push=0
dry_run=0
bake=0
sizes=0
build_opts=()
while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    -t | --tag)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs an image name"
      image="$2"
      shift 2
      ;;
    --push) push=1 && shift ;;
    --no-cache) build_opts+=(--no-cache) && shift ;;
    --bake) bake=1 && shift ;;
    --sizes) sizes=1 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    --build-arg | --secret)
      [[ $# -ge 2 && "$2" == *=* ]] || die "$1 needs NAME=VALUE (got '${2:-}')"
      build_opts+=("$1" "$2")
      shift 2
      ;;
    --build-arg=* | --secret=*)
      [[ "${1#*=}" == *=* ]] || die "${1%%=*} needs NAME=VALUE (got '${1#*=}')"
      build_opts+=("${1%%=*}" "${1#*=}")
      shift
      ;;
    --)
      shift
      build_opts+=("$@")
      break
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if ((push)) && [[ "${image%%/*}" == "$image" ]]; then
  die "--push needs an image name with a registry, e.g. -t ghcr.io/you/comfy-worker:v1 (got '$image')"
fi

run() {
  if ((dry_run)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

cmd=("$ENGINE" build --platform linux/amd64 -f "$HERE/Dockerfile" -t "$image")
if [[ "$(basename "$ENGINE")" == podman* ]]; then
  cmd+=(--format docker)
fi

secrets_dir=""
cleanup() { [[ -z "$secrets_dir" ]] || rm -rf "$secrets_dir"; }
trap cleanup EXIT
if ((bake)); then
  cmd+=(--build-arg BAKE=1)
  for name in HF_TOKEN CIVITAI_TOKEN GITHUB_TOKEN; do
    [[ -n "${!name:-}" ]] || continue
    if [[ -z "$secrets_dir" ]]; then
      secrets_dir="$(mktemp -d)"
      chmod 700 "$secrets_dir"
    fi
    (umask 077 && printf '%s' "${!name}" >"$secrets_dir/$name")
    cmd+=(--secret "id=$name,src=$secrets_dir/$name")
  done
fi
cmd+=(${build_opts[@]+"${build_opts[@]}"} "$HERE")

run "${cmd[@]}"
if ((push)); then
  run "$ENGINE" push "$image"
fi
if ((sizes)); then
  history=("$ENGINE" history --no-trunc --human=false --format '{{.Size}}\t{{.CreatedBy}}' "$image")
  if ((dry_run)); then
    run "${history[@]}"
  else
    "${history[@]}" | (cd "$HERE" && python3 -m comfy_worker.image_layers "$image")
  fi
fi
if ((!dry_run)); then
  if ((push)); then
    echo "build.sh: built and pushed $image (linux/amd64)"
  else
    echo "build.sh: built $image (linux/amd64)"
  fi
fi
