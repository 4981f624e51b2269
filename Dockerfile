# syntax=docker/dockerfile:1
# comfy-worker: a config-driven, self-provisioning ComfyUI worker (docs/image-reference.md).
# Build with ./build.sh (always linux/amd64). Layers run from the least to the most often changed:
# system packages, the venv, torch, ComfyUI's requirements, the project's requirements, the code, and
# (only with BAKE=1) the provisioned models and nodes. A code change rebuilds the last two only.
# The base: plain Ubuntu 24.04. torch's CUDA wheels bring their own CUDA runtime, cuBLAS, cuDNN... (the
# nvidia-* packages) and the NVIDIA container runtime injects the driver, so a CUDA base image would be a
# second copy of those libraries (GBs in every pull). For custom nodes that compile CUDA code or load CUDA
# libraries without torch: --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 (or -runtime-).
ARG BASE_IMAGE=docker.io/library/ubuntu:24.04
FROM ${BASE_IMAGE}

# A CA bundle for pip/uv/git behind a TLS-intercepting proxy (a path inside the build, e.g. a file
# mounted with `podman build -v`); empty: the system's CAs.
ARG PIP_CERT=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ---- system packages: Python, git, tcmalloc, tini, the libraries common custom nodes load ----
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
 && tcmalloc=libtcmalloc-minimal4 \
 && if apt-cache show libtcmalloc-minimal4t64 >/dev/null 2>&1; then tcmalloc=libtcmalloc-minimal4t64; fi \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv git ca-certificates tini libgl1 libglib2.0-0 "$tcmalloc" \
 && rm -rf /var/lib/apt/lists/* \
 && test -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
 && printf '%s\n' \
      '# sourced by the RUN steps of the Dockerfile: the build CA bundle for pip, uv, git and requests' \
      'if [ -n "${PIP_CERT:-}" ]; then export SSL_CERT_FILE="$PIP_CERT" GIT_SSL_CAINFO="$PIP_CERT" REQUESTS_CA_BUNDLE="$PIP_CERT"; else unset PIP_CERT; fi' \
      '# every package installed while building is byte-compiled, so no new container compiles it again on' \
      '# its first import (torch: 2.8 s to import from source, 1.3 s from .pyc files)' \
      'export UV_COMPILE_BYTECODE=1' \
      >/usr/local/lib/comfy-worker-build-env.sh

# ---- the virtualenv at /opt/venv (first on PATH: start.sh's `python`) with uv ----
ARG UV_VERSION=0.13.9
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_LINK_MODE=copy
RUN . /usr/local/lib/comfy-worker-build-env.sh \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"

# ---- torch: a CUDA 12.8 build by default (PyPI's torch 2.9.1 is one), pinned from here on ----
# TORCH_INDEX_URL: e.g. https://download.pytorch.org/whl/cu128 for PyTorch's own index.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_PACKAGES="torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1"
RUN --mount=type=cache,target=/root/.cache/uv \
    . /usr/local/lib/comfy-worker-build-env.sh \
 && echo "$TORCH_PACKAGES" | tr -s ' ' '\n' >/tmp/torch-requirements.txt \
 && uv pip install --python /opt/venv/bin/python --index-url "$TORCH_INDEX_URL" -r /tmp/torch-requirements.txt \
 && rm /tmp/torch-requirements.txt \
 && python -c 'from importlib.metadata import version; [print(f"{p}=={version(p)}") for p in ("torch", "torchvision", "torchaudio")]' \
      >/opt/venv/torch-constraints.txt \
 && cat /opt/venv/torch-constraints.txt

# ---- ComfyUI's requirements for COMFYUI_REF, torch pinned, recorded the way comfy_worker records them
# (comfyui_checkout.py), so a container on a volume already holding that ComfyUI starts without pip ----
ARG COMFYUI_REPO=https://github.com/comfyanonymous/ComfyUI.git
ARG COMFYUI_REF=v0.3.75
RUN --mount=type=cache,target=/root/.cache/uv \
    . /usr/local/lib/comfy-worker-build-env.sh \
 && src="$(mktemp -d)" \
 && git clone -q --depth 1 --branch "$COMFYUI_REF" "$COMFYUI_REPO" "$src/ComfyUI" \
 && uv pip install --python /opt/venv/bin/python -c /opt/venv/torch-constraints.txt -r "$src/ComfyUI/requirements.txt" \
 && printf '{"sha256": "%s"}' "$(sha256sum "$src/ComfyUI/requirements.txt" | cut -d' ' -f1)" \
      >/opt/venv/comfy-worker-comfyui-requirements.json \
 && rm -rf "$src"

# ---- the project's requirements (handler, provisioning, JupyterLab), torch pinned ----
COPY requirements.txt /app/requirements.txt
RUN --mount=type=cache,target=/root/.cache/uv \
    . /usr/local/lib/comfy-worker-build-env.sh \
 && uv pip install --python /opt/venv/bin/python -c /opt/venv/torch-constraints.txt -r /app/requirements.txt \
 && python -c 'from importlib.metadata import version; [print(f"{p}=={version(p)}") for p in ("torch", "torchvision", "torchaudio")]' \
      | diff - /opt/venv/torch-constraints.txt

# ---- the code and the baked config.yml (.dockerignore keeps tests, .venv, .cache, workspace/ out),
# byte-compiled as the packages are ----
COPY . /app
WORKDIR /app
RUN python -m compileall -q /app

# ---- bake mode (BAKE=1): provision config.yml (or the CONFIG_YML build arg) into /workspace now, so
# the image carries ComfyUI, the models and the nodes, and VOLUME_ROOT=/workspace makes every start use
# them (a start then skips provisioning, whatever volume is attached). Tokens come only as build
# secrets (--secret id=HF_TOKEN / CIVITAI_TOKEN / GITHUB_TOKEN), never as build args: they are in no
# layer and no image setting. ComfyUI's ref is the config's, as at run time. ComfyUI and the nodes are
# byte-compiled too (a file that does not compile, e.g. a node's script for another Python, is left as
# it is: compiled on import, if ever). ----
ARG BAKE=""
ARG CONFIG_YML=""
ARG HF_ENDPOINT=""
ARG CIVITAI_BASE_URL=""
RUN --mount=type=secret,id=HF_TOKEN \
    --mount=type=secret,id=CIVITAI_TOKEN \
    --mount=type=secret,id=GITHUB_TOKEN \
    --mount=type=cache,target=/root/.cache/uv \
    if [ -z "$BAKE" ]; then exit 0; fi \
 && . /usr/local/lib/comfy-worker-build-env.sh \
 && for name in HF_TOKEN CIVITAI_TOKEN GITHUB_TOKEN; do \
      if [ -s "/run/secrets/$name" ]; then export "$name=$(cat "/run/secrets/$name")"; fi; \
    done \
 && if [ -z "$CONFIG_YML" ]; then unset CONFIG_YML; fi \
 && if [ -z "$HF_ENDPOINT" ]; then unset HF_ENDPOINT; fi \
 && if [ -z "$CIVITAI_BASE_URL" ]; then unset CIVITAI_BASE_URL; fi \
 && mkdir -p /workspace \
 && env -u COMFYUI_REF VOLUME_ROOT=/workspace MODE=local ./start.sh --provision-only \
 && { python -m compileall -qq /workspace/ComfyUI || true; }

# NVIDIA_*: what the CUDA images set, so the NVIDIA container runtime gives the container the GPUs and the
# driver's compute libraries whatever the base
ENV VOLUME_ROOT=${BAKE:+/workspace} \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ComfyUI, the local API (pod/local), JupyterLab
EXPOSE 8188 8000 8888
# Root: RunPod mounts /runpod-volume and /workspace root-owned and pods expect root (SSH, Jupyter).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30m --retries=3 \
    CMD ["/opt/venv/bin/python", "/app/scripts/healthcheck.py"]
# tini reaps ComfyUI's and the nodes' children and passes SIGTERM to the whole group (-g), so a stop
# ends a provisioning run as fast as the services.
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/app/start.sh"]
