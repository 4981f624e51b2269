#!/usr/bin/env bash
# Checks the config, builds and pushes the image, then deploys it to a RunPod serverless endpoint (or
# prints what to paste into RunPod). Guide: docs/runpod-guide.md; the image: docs/image-reference.md.
#   ./deploy.sh --endpoint NAME --image REF [deploy options]      deploy an image already pushed (no build)
#   ./deploy.sh -t REGISTRY/NAME:TAG --endpoint NAME [options]     build, push, then deploy it by digest
#   ./deploy.sh -t REGISTRY/NAME:TAG [--config FILE] [options]     build, push, print the digest and CONFIG_YML
#   -t IMAGE        where to push (a registry RunPod can pull from)
#   --config FILE   the config.yml that becomes CONFIG_YML (default: config.yml here)
#   --allow-dirty   build even with uncommitted changes (they would go into the image unrecorded)
#   --dry-run       print the build and push commands, and the requests to RunPod, instead of sending them
#   other build options (--no-cache, --bake, --build-arg N=V, --secret SPEC) go to build.sh
# Deploy options (RunPod's REST API at RUNPOD_API_URL, with the key in RUNPOD_API_KEY, never printed):
#   --endpoint NAME            create the serverless endpoint NAME, or update the one of that name in place
#   --image REF                the pushed image (best by digest: REPO@sha256:...)
#   --gpu POOL                 a GPU pool, repeatable (default ADA_24 and AMPERE_24 on create)
#   --cuda X.Y                 an allowed CUDA version, repeatable (default on create: 12.8 or newer)
#   --network-volume ID|NAME   the network volume (mounted at /runpod-volume)
#   --flashboot MODE           FLASHBOOT (default), OFF or PRIORITY_FLASHBOOT
#   --workers-min N, --workers-max N, --idle-timeout S, --execution-timeout S
#   --env NAME=VALUE           a plain setting, repeatable (a secret's name is refused: use --env-secret)
#   --env-secret VAR=secret    VAR set to the RunPod secret 'secret' ({{ RUNPOD_SECRET_secret }}), repeatable
#   --from-workflow W.json     deploy the config plus what W.json needs (written to W.config.yml), repeatable
#   --smoke                    after deploying, send a job through /runsync; --smoke-request FILE: that job
# CONTAINER_ENGINE picks the engine: docker (default) or podman.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENGINE="${CONTAINER_ENGINE:-docker}"

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; }
die() {
  echo "deploy.sh: $*" >&2
  exit 2
}

image=""
config="$HERE/config.yml"
allow_dirty=0
dry_run=0
build_opts=()
endpoint=""
deploy_image=""
deploy_opts=()
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
    --config)
      [[ $# -ge 2 && -n "$2" ]] || die "--config needs a file"
      config="$2"
      shift 2
      ;;
    --allow-dirty) allow_dirty=1 && shift ;;
    --dry-run) dry_run=1 && shift ;;
    --no-cache | --bake) build_opts+=("$1") && shift ;;
    --build-arg | --secret)
      [[ $# -ge 2 ]] || die "$1 needs NAME=VALUE"
      build_opts+=("$1" "$2")
      shift 2
      ;;
    --build-arg=* | --secret=*) build_opts+=("$1") && shift ;;
    --endpoint)
      [[ $# -ge 2 && -n "$2" ]] || die "--endpoint needs the endpoint's name"
      endpoint="$2"
      shift 2
      ;;
    --image)
      [[ $# -ge 2 && -n "$2" ]] || die "--image needs an image reference (REPO@sha256:...)"
      deploy_image="$2"
      shift 2
      ;;
    --gpu | --cuda | --network-volume | --flashboot | --workers-min | --workers-max | --idle-timeout | \
      --execution-timeout | --env | --env-secret | --from-workflow | --smoke-request)
      [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
      deploy_opts+=("$1" "$2")
      shift 2
      ;;
    --smoke) deploy_opts+=("$1") && shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if [[ -z "$endpoint" ]]; then
  [[ -z "$deploy_image" && ${#deploy_opts[@]} -eq 0 ]] || die "deploy options (--image, --gpu, --env, ...) need --endpoint NAME"
else
  [[ -z "$image" || -z "$deploy_image" ]] || die "give -t IMAGE (build, push, then deploy) or --image REF (deploy a pushed image), not both"
  [[ -n "$image" || -n "$deploy_image" ]] || die "--endpoint needs --image REF (an image already pushed) or -t REGISTRY/NAME:TAG (build and push it first)"
fi
if [[ -z "$deploy_image" ]]; then
  [[ -n "$image" ]] || die "-t REGISTRY/NAME:TAG is required (e.g. -t ghcr.io/you/comfy-worker:$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo v1))"
  [[ "${image%%/*}" != "$image" ]] || die "-t needs an image name with a registry, e.g. ghcr.io/you/comfy-worker:v1 (got '$image')"
fi
[[ -f "$config" ]] || die "no config file at $config"

# The config is checked first, exactly as download_models.py --validate-only checks it, and every
# source a RunPod worker cannot reach is warned about (comfy_worker/deploy_check.py): an invalid
# config ends here, before any build, with nothing to paste.
# shellcheck source=scripts/project_python.sh
source "$HERE/scripts/project_python.sh"
project_python "$HERE"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -m comfy_worker.deploy_check --config "$config" >&2; then
  die "$config is invalid (see above): fix it, then deploy again"
fi

# Deploying goes through RunPod's REST API (comfy_worker/runpod_deploy.py): the options, the key and
# --from-workflow are checked before anything is built; the endpoint is created or updated after the push.
runpod_deploy() {
  "$PY" -m comfy_worker.runpod_deploy --endpoint "$endpoint" --config "$config" "$@" \
    ${deploy_opts[@]+"${deploy_opts[@]}"}
}
dry_flag=()
((!dry_run)) || dry_flag=(--dry-run)
if [[ -n "$deploy_image" ]]; then # an image already pushed: no build
  runpod_deploy --image "$deploy_image" ${dry_flag[@]+"${dry_flag[@]}"}
  exit 0
fi
if [[ -n "$endpoint" ]]; then
  runpod_deploy --check-only ${dry_flag[@]+"${dry_flag[@]}"}
fi

# The image must be what a commit holds: uncommitted or untracked files would go into the build.
if ! git -C "$HERE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  ((allow_dirty)) || die "$HERE is not a git work tree: the image could not be traced to a commit (--allow-dirty to build anyway)"
else
  dirty="$(git -C "$HERE" status --porcelain --untracked-files=normal)"
  if [[ -n "$dirty" ]]; then
    if ((!allow_dirty)); then
      echo "deploy.sh: the git tree has uncommitted changes; commit them or pass --allow-dirty:" >&2
      printf '%s\n' "$dirty" | sed 's/^/  /' >&2
      exit 1
    fi
    echo "deploy.sh: WARNING: building with uncommitted changes (--allow-dirty)" >&2
  fi
fi

# The config travels as base64, made here: it never goes through a website.
config_b64="$(base64 <"$config" | tr -d '\n')"

build=("$HERE/build.sh" -t "$image" ${build_opts[@]+"${build_opts[@]}"})
repo="$image" # the name without its tag (a registry's :port stays)
if [[ "${image##*/}" == *:* ]]; then
  repo="${image%:*}"
fi
pushed="Pushed"
if ((dry_run)); then
  pushed="Dry run, would push"
  CONTAINER_ENGINE="$ENGINE" "${build[@]}" --dry-run
  printf '%q ' "$ENGINE" push "$image" | sed 's/ $//'
  echo
  digest_ref="$repo@sha256:<digest after the push>"
else
  CONTAINER_ENGINE="$ENGINE" "${build[@]}"
  if [[ "$(basename "$ENGINE")" == podman* ]]; then
    digest_file="$(mktemp)"
    trap 'rm -f "$digest_file"' EXIT
    "$ENGINE" push --digestfile "$digest_file" "$image"
    digest_ref="$repo@$(cat "$digest_file")"
  else
    "$ENGINE" push "$image"
    digest_ref="$("$ENGINE" image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image" | grep -F "$repo@" | head -n 1 || true)"
    [[ -n "$digest_ref" ]] || die "pushed $image but found no digest for it (docker image inspect $image)"
  fi
fi

echo
echo "$pushed: $digest_ref"
if [[ -n "$endpoint" ]]; then
  runpod_deploy --image "$digest_ref" ${dry_flag[@]+"${dry_flag[@]}"}
  exit 0
fi
echo "RunPod > your endpoint or template > Container Image: $digest_ref"
echo "RunPod > Environment Variables: paste this line (the config, base64 of $(basename "$config")):"
echo
echo "CONFIG_YML=$config_b64"
