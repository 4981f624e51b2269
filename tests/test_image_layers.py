"""image_layers: the table ``build.sh --sizes`` prints from docker's or podman's ``history`` (issue 25)."""

from __future__ import annotations

import subprocess
import sys

from support.comfy_process import ROOT

from comfy_worker.image_layers import table

# podman 4 (newest first; sizes for people even with --human=false; a RUN with its build args before it)
PODMAN = "\n".join(
    [
        '0 B\t/bin/sh -c #(nop) ENTRYPOINT ["/usr/bin/tini"]',
        "933 kB\t/bin/sh -c #(nop) COPY dir:1129 in /app ",
        "4.83 GB\t|6 PIP_CERT=/etc/host-ca.crt TORCH_PACKAGES=torch==2.9.1 torchvision==0.24.1 UV_VERSION=0.13.9 "
        "/bin/sh -c --mount=type=cache,target=/root/.cache/uv     . /usr/local/lib/comfy-worker-build-env.sh  "
        '&& echo "$TORCH_PACKAGES" >/tmp/t.txt',
        '0 B\t/bin/sh -c #(nop) SHELL ["/bin/bash", "-o", "pipefail", "-c"]',
        "78.1 MB\t/bin/sh -c #(nop) ADD file:bd1c in /",
    ]
)
# docker with BuildKit and --human=false (bytes; the shell of the SHELL instruction; a "# buildkit" suffix)
DOCKER = "\n".join(
    [
        '0\tENTRYPOINT ["/usr/bin/tini"]',
        "933376\tCOPY . /app # buildkit",
        "4830000000\tRUN |6 PIP_CERT= TORCH_PACKAGES=torch==2.9.1 torchvision==0.24.1 /bin/bash -o pipefail -c "
        '. /usr/local/lib/comfy-worker-build-env.sh  && echo "$TORCH_PACKAGES" >/tmp/t.txt # buildkit',
        "78100000\t/bin/sh -c #(nop) ADD file:bd1c in / ",
    ]
)


def test_every_layer_oldest_first_with_its_step_then_the_metadata_steps_and_the_total():
    assert table(PODMAN) == [
        "      SIZE  STEP (oldest first)",
        "   78.1 MB  ADD file:bd1c in /",
        '   4.83 GB  RUN echo "$TORCH_PACKAGES" >/tmp/t.txt',
        "    933 kB  COPY dir:1129 in /app",
        "       0 B  2 steps that only set metadata (ENV, ARG, EXPOSE, ...)",
        "   4.91 GB  in all (5 layers)",
    ]
    assert table(DOCKER)[1:4] == [
        "   78.1 MB  ADD file:bd1c in /",
        '   4.83 GB  RUN echo "$TORCH_PACKAGES" >/tmp/t.txt',
        "    933 kB  COPY . /app",
    ]


def test_no_history_or_an_unreadable_one_is_an_error_naming_it():
    def run(text: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "comfy_worker.image_layers", "r.example/w:1"]
        return subprocess.run(cmd, input=text, cwd=ROOT, capture_output=True, text=True, timeout=30)

    empty = run("")
    assert empty.returncode == 1 and "no layers read for r.example/w:1" in empty.stderr
    wrong = run("IMAGE  CREATED  SIZE\tx\n")
    assert (
        wrong.returncode == 1
        and "not the output of the engine's 'history' (a layer size 'IMAGE  CREATED  SIZE')" in wrong.stderr
    )
