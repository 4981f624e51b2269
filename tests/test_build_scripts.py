"""build.sh and deploy.sh: their arguments, the commands they run, the CONFIG_YML line, the refusal of
a dirty git tree; docker-compose.yml, .env.example and .dockerignore.

No registry can run here, so the container engine is a stub (``CONTAINER_ENGINE``) that records its
arguments, and, for a build secret, what the secret file held (then the file is gone: build.sh
removes it). The real engine builds and runs the image in tests/test_container.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.gitrepos import git
from support.runpod_rest_fake import RunPodRestFake

from comfy_worker.config_schema import decode_config_env

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "ab" * 32
STUB = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
secrets = {{}}
for i, a in enumerate(args[:-1]):
    if a == "--secret":
        spec = dict(kv.split("=", 1) for kv in args[i + 1].split(","))
        secrets[spec["id"]] = open(spec["src"]).read()
        secrets[spec["id"] + ".mode"] = oct(os.stat(spec["src"]).st_mode & 0o777)
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"engine": os.path.basename(sys.argv[0]), "args": args, "secrets": secrets}}) + "\\n")
if args[:1] == ["push"] and "--digestfile" in args:
    open(args[args.index("--digestfile") + 1], "w").write("{DIGEST}")
if args[:1] == ["history"]:  # podman's way: sizes for people whatever --human says, newest layer first
    print("0 B\t/bin/sh -c #(nop) ENV VOLUME_ROOT=")
    print("4.83 GB\t|2 PIP_CERT= TORCH_PACKAGES=torch==2.9.1 torchvision==0.24.1 /bin/sh -c uv pip install torch")
    print("78.1 MB\t/bin/sh -c #(nop) ADD file:0123 in /")
if args[:2] == ["image", "inspect"]:
    name = args[-1].rsplit(":", 1)[0]
    print("other.example/x@sha256:" + "cd" * 32)
    print(f"{{name}}@{DIGEST}")
"""


@pytest.fixture
def stub(tmp_path):
    """CONTAINER_ENGINE stubs named docker and podman; ``calls()`` reads what they were asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "podman"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "engine.log"

    class Stub:
        docker = bin_dir / "docker"
        podman = bin_dir / "podman"

        @staticmethod
        def env(engine: Path, **extra: str) -> dict[str, str]:
            env = {k: v for k, v in os.environ.items() if not k.endswith("_TOKEN") and k != "CONFIG_YML"}
            return {**env, "CONTAINER_ENGINE": str(engine), "STUB_LOG": str(log), "PYTHON": sys.executable, **extra}

        @staticmethod
        def calls() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return Stub


def run(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def test_build_help_and_bad_arguments(stub):
    r = run(ROOT / "build.sh", "--help")
    assert r.returncode == 0
    for flag in (
        "-t IMAGE",
        "--push",
        "--no-cache",
        "--build-arg",
        "--secret",
        "--bake",
        "--sizes",
        "--dry-run",
        "CONTAINER_ENGINE",
    ):
        assert flag in r.stdout
    env = stub.env(stub.docker)
    for args, message in (
        (["--wat"], "unknown argument '--wat'"),
        (["-t"], "-t needs an image name"),
        (["--build-arg", "NOEQUALS"], "--build-arg needs NAME=VALUE"),
        (["--push"], "--push needs an image name with a registry"),
    ):
        r = run(ROOT / "build.sh", *args, env=env)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert stub.calls() == []


def test_build_runs_the_engine_for_linux_amd64_with_every_option_passed_through(stub):
    env = stub.env(stub.docker)
    r = run(
        ROOT / "build.sh",
        "-t", "registry.example/me/worker:v2", "--no-cache", "--push",
        "--build-arg", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128",
        "--build-arg=COMFYUI_REF=v0.3.76", "--secret", "id=extra,src=/dev/null",
        env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    build, push = stub.calls()
    assert build["engine"] == "docker"
    assert build["args"] == [
        "build", "--platform", "linux/amd64", "-f", str(ROOT / "Dockerfile"), "-t", "registry.example/me/worker:v2",
        "--no-cache", "--build-arg", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128",
        "--build-arg", "COMFYUI_REF=v0.3.76", "--secret", "id=extra,src=/dev/null", str(ROOT),
    ]  # fmt: skip
    assert push["args"] == ["push", "registry.example/me/worker:v2"]
    assert "built and pushed registry.example/me/worker:v2" in r.stdout

    # podman: the docker image format (HEALTHCHECK, SHELL), still linux/amd64; no push without --push
    r = run(ROOT / "build.sh", env=stub.env(stub.podman))
    assert r.returncode == 0, r.stderr
    (build,) = stub.calls()[2:]
    assert build["engine"] == "podman" and build["args"][:3] == ["build", "--platform", "linux/amd64"]
    assert "--format" in build["args"] and build["args"][build["args"].index("--format") + 1] == "docker"
    assert build["args"][build["args"].index("-t") + 1] == "comfy-worker:latest"


def test_bake_passes_tokens_as_build_secrets_never_as_arguments(stub):
    tokens = {"HF_TOKEN": "hf_build_secret_1", "GITHUB_TOKEN": "ghp_build_secret_2"}
    r = run(ROOT / "build.sh", "--bake", "-t", "r.example/w:1", env=stub.env(stub.docker, **tokens))
    assert r.returncode == 0, r.stderr
    (build,) = stub.calls()
    assert build["args"][build["args"].index("--build-arg") + 1] == "BAKE=1"
    assert build["secrets"] == {
        "HF_TOKEN": tokens["HF_TOKEN"],
        "HF_TOKEN.mode": "0o600",
        "GITHUB_TOKEN": tokens["GITHUB_TOKEN"],
        "GITHUB_TOKEN.mode": "0o600",
    }
    text = json.dumps(build["args"]) + r.stdout + r.stderr
    assert all(value not in text for value in tokens.values())
    srcs = [a.split("src=")[1] for a in build["args"] if a.startswith("id=")]
    assert len(srcs) == 2 and not any(Path(s).exists() for s in srcs)  # removed after the build


def test_build_dry_run_prints_the_commands_and_runs_nothing(stub):
    r = run(ROOT / "build.sh", "--dry-run", "-t", "r.example/w:1", "--push", env=stub.env(stub.docker))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{stub.docker} build --platform linux/amd64 -f ")
    assert lines[1] == f"{stub.docker} push r.example/w:1"
    assert stub.calls() == []


def test_build_sizes_prints_every_layer_of_the_built_image(stub):
    """issue 25: the image's weight, layer by layer (the table in docs/image-reference.md)."""
    r = run(ROOT / "build.sh", "--sizes", "-t", "r.example/w:1", env=stub.env(stub.podman))
    assert r.returncode == 0, r.stderr
    build, history = stub.calls()
    assert build["args"][0] == "build"
    assert history["args"] == [
        "history", "--no-trunc", "--human=false", "--format", r"{{.Size}}\t{{.CreatedBy}}", "r.example/w:1"
    ]  # fmt: skip
    table = r.stdout.splitlines()
    assert table[1:] == [
        "   78.1 MB  ADD file:0123 in /",
        "   4.83 GB  RUN uv pip install torch",
        "       0 B  1 steps that only set metadata (ENV, ARG, EXPOSE, ...)",
        "   4.91 GB  in all (3 layers)",
        "build.sh: built r.example/w:1 (linux/amd64)",
    ]
    r = run(ROOT / "build.sh", "--sizes", "--dry-run", "-t", "r.example/w:1", env=stub.env(stub.docker))
    assert r.returncode == 0 and r.stdout.splitlines()[1].startswith(f"{stub.docker} history --no-trunc ")


def test_the_default_base_is_plain_ubuntu_and_the_cuda_base_one_build_arg_away():
    """issue 25: the default base nvidia/cuda:…-cudnn-runtime added a second copy of the CUDA and cuDNN that
    torch's wheels bring; it stays available through BASE_IMAGE (docs/image-reference.md)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert default == "docker.io/library/ubuntu:24.04"
    assert (
        dockerfile.splitlines()[dockerfile.splitlines().index(f"ARG BASE_IMAGE={default}") + 1] == "FROM ${BASE_IMAGE}"
    )
    assert (
        "--build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04"
        in (ROOT / "docs" / "image-reference.md").read_text()
    )


@pytest.fixture
def clone(tmp_path):
    """A committed git repo holding the scripts, the Dockerfile and a config (deploy.sh's own folder)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("build.sh", "deploy.sh", "Dockerfile", "config.yml", ".dockerignore", ".gitignore"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "comfy_worker", repo / "comfy_worker", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "project_python.sh", repo / "scripts")
    (repo / "config.yml").write_text("# ünïcode comment\nmodels: []\nnodes: []\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "init")
    return repo


def config_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("CONFIG_YML=")]
    return line.split("=", 1)[1]


def test_deploy_builds_pushes_and_prints_the_digest_and_the_config_line(stub, clone):
    r = run(clone / "deploy.sh", "-t", "registry.example/me/worker:v3", "--no-cache", env=stub.env(stub.docker))
    assert r.returncode == 0, r.stderr
    build, push, inspect = stub.calls()
    assert build["args"][:3] == ["build", "--platform", "linux/amd64"] and "--no-cache" in build["args"]
    assert build["args"][-1] == str(clone)
    assert push["args"] == ["push", "registry.example/me/worker:v3"]
    assert inspect["args"][:2] == ["image", "inspect"]
    assert f"Pushed: registry.example/me/worker@{DIGEST}" in r.stdout
    assert decode_config_env(config_line(r.stdout)) == (clone / "config.yml").read_text()

    # podman: the digest from push --digestfile; another config file
    other = clone / "other.yml"
    other.write_text("models: []\nnodes: []\ncomfyui:\n  ref: v0.3.75\n")
    git(clone, "add", "other.yml")
    git(clone, "commit", "-q", "-m", "other")
    r = run(clone / "deploy.sh", "-t", "localhost:5000/w:1", "--config", str(other), env=stub.env(stub.podman))
    assert r.returncode == 0, r.stderr
    push = stub.calls()[-1]
    assert push["args"][0] == "push" and "--digestfile" in push["args"]
    assert f"Pushed: localhost:5000/w@{DIGEST}" in r.stdout
    assert decode_config_env(config_line(r.stdout)) == other.read_text()


def test_deploy_refuses_a_dirty_tree_unless_allowed(stub, clone):
    env = stub.env(stub.docker)
    (clone / "config.yml").write_text("models: []\n")  # modified
    (clone / "notes.txt").write_text("untracked files would go into the image too\n")
    r = run(clone / "deploy.sh", "-t", "r.example/w:1", env=env)
    assert r.returncode == 1
    assert "uncommitted changes" in r.stderr and "config.yml" in r.stderr and "notes.txt" in r.stderr
    assert stub.calls() == []
    r = run(clone / "deploy.sh", "-t", "r.example/w:1", "--allow-dirty", env=env)
    assert r.returncode == 0, r.stderr
    assert "WARNING: building with uncommitted changes" in r.stderr
    assert decode_config_env(config_line(r.stdout)) == "models: []\n"
    assert [c["args"][0] for c in stub.calls()] == ["build", "push", "image"]


def test_deploy_runs_after_the_quickstart_wrote_outputs(stub, clone):
    """issue 21 #7: the examples write outputs/ (their default --out) at the repo's root; deploy.sh then still
    runs, and outputs/ is kept out of the image's build context."""
    for script in ("client.py", "test_local.py"):
        assert 'default=Path("outputs")' in (ROOT / "examples" / script).read_text()
    (clone / "outputs").mkdir()
    (clone / "outputs" / "ComfyUI_00001_.png").write_bytes(b"\x89PNG")
    r = run(clone / "deploy.sh", "-t", "r.example/w:1", env=stub.env(stub.docker))
    assert r.returncode == 0, r.stderr
    assert "uncommitted" not in r.stderr
    assert "outputs" in (clone / ".dockerignore").read_text().split()


def test_deploy_refuses_an_invalid_config_before_building_with_the_validate_only_messages(stub, clone):
    """issue 21 #6: a misspelt key exits 2 with exactly what --validate-only says, builds nothing and
    prints nothing to paste."""
    bad = clone / "bad.yml"
    bad.write_text("models:\n  - url: https://huggingface.co/a/b/resolve/main/m.safetensors\n    destinaton: loras\n")
    git(clone, "add", "bad.yml")
    git(clone, "commit", "-q", "-m", "bad")
    r = run(clone / "deploy.sh", "-t", "r.example/w:1", "--config", str(bad), env=stub.env(stub.docker))
    assert r.returncode == 2
    assert "CONFIG_YML=" not in r.stdout and stub.calls() == []
    check = subprocess.run(
        [sys.executable, "download_models.py", "--validate-only", "--config", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 2
    problems = [ln for ln in check.stderr.splitlines() if ln.startswith("  ")]
    assert problems and any("destinaton" in ln for ln in problems)
    for line in problems:
        assert line in r.stderr.splitlines(), (line, r.stderr)
    assert "bad.yml is invalid (see above)" in r.stderr


def test_deploy_warns_about_sources_a_runpod_worker_cannot_reach(stub, clone):
    """issue 21 #6: loopback, private and local-network hosts, file:// and local-path nodes are warned
    about by entry; public sources are not; the deploy goes on."""
    cfg = clone / "config.yml"
    cfg.write_text(
        "models:\n"
        "  - {url: 'http://127.0.0.1:8080/a.safetensors', destination: loras}\n"
        "  - {url: 'https://huggingface.co/o/r/resolve/main/b.safetensors', destination: loras}\n"
        "  - {url: 'http://192.168.1.20/c.safetensors', destination: loras}\n"
        "  - {url: 'http://nas.local/d.safetensors', destination: loras}\n"
        "nodes:\n"
        "  - {url: 'file:///home/me/MyNode', version: latest}\n"
        "  - {url: '/home/me/OtherNode', version: latest}\n"
        "  - {url: 'https://github.com/o/PublicNode', version: latest}\n"
        "  - {url: 'git@10.0.0.5:o/PrivateNode.git', version: latest}\n"
    )
    git(clone, "commit", "-q", "-am", "local sources")
    r = run(clone / "deploy.sh", "-t", "r.example/w:1", "--dry-run", env=stub.env(stub.docker))
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert [ln.split(" ")[1] for ln in warned] == [
        "models[0]",
        "models[2]",
        "models[3]",
        "nodes[0]",
        "nodes[1]",
        "nodes[3]",
    ]
    assert all("a RunPod worker cannot fetch it" in ln for ln in warned)
    assert "CONFIG_YML=" in r.stdout


def test_deploy_arguments(stub, clone):
    env = stub.env(stub.docker)
    r = run(clone / "deploy.sh", "--help")
    assert r.returncode == 0 and "--allow-dirty" in r.stdout and "CONFIG_YML" in r.stdout
    for args, message in (
        ([], "-t REGISTRY/NAME:TAG is required"),
        (["-t", "worker:1"], "needs an image name with a registry"),
        (["-t", "r.example/w:1", "--config", str(clone / "missing.yml")], "no config file at"),
        (["-t", "r.example/w:1", "--wat"], "unknown argument '--wat'"),
    ):
        r = run(clone / "deploy.sh", *args, env=env)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = run(clone / "deploy.sh", "-t", "r.example/w:1", "--dry-run", "--bake", "--build-arg", "A=1", env=env)
    assert r.returncode == 0, r.stderr
    assert stub.calls() == []
    lines = r.stdout.splitlines()
    assert (
        "--build-arg BAKE=1" in lines[0] and "--build-arg A=1" in lines[0] and lines[1].endswith("push r.example/w:1")
    )
    assert "Dry run, would push: r.example/w@sha256:" in r.stdout
    assert decode_config_env(config_line(r.stdout)) == (clone / "config.yml").read_text()


def test_deploy_with_an_endpoint_builds_pushes_then_deploys_the_digest(stub, clone):
    """-t IMAGE --endpoint NAME: the deploy options are checked before the build; after the push the
    endpoint gets the image by digest (RunPod's REST API: a loopback fake, tests/test_runpod_deploy.py)."""
    key = "rpa_build_path_key_123456"
    fake = RunPodRestFake(key)
    try:
        env = stub.env(stub.docker, RUNPOD_API_KEY=key, RUNPOD_API_URL=fake.url)
        for args, message in (
            (["--endpoint", "w", "-t", "r.example/w:1", "--image", "r.example/w@" + DIGEST], "not both"),
            (["--endpoint", "w"], "--endpoint needs --image REF"),
            (["-t", "r.example/w:1", "--gpu", "ADA_24"], "need --endpoint NAME"),
            (["-t", "r.example/w:1", "--endpoint", "w", "--cuda", "12"], "--cuda '12'"),
        ):
            r = run(clone / "deploy.sh", *args, env=env)
            assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        r = run(clone / "deploy.sh", "-t", "r.example/w:1", "--endpoint", "w", env={**env, "RUNPOD_API_KEY": ""})
        assert r.returncode == 2 and "RUNPOD_API_KEY is not set" in r.stderr
        assert stub.calls() == [] and fake.requests == []  # refused before anything was built or sent

        r = run(clone / "deploy.sh", "-t", "registry.example/me/worker:v4", "--endpoint", "built", env=env)
        assert r.returncode == 0, r.stderr
        assert [c["args"][0] for c in stub.calls()] == ["build", "push", "image"]
        (endpoint,) = fake.endpoints.values()
        assert endpoint["image"] == f"registry.example/me/worker@{DIGEST}" and endpoint["flashboot"] == "FLASHBOOT"
        assert decode_config_env(endpoint["env"]["CONFIG_YML"]) == (clone / "config.yml").read_text()
        assert "endpoint built: created" in r.stdout and "CONFIG_YML=" not in r.stdout  # nothing to paste
        assert fake.invalid == [] and key not in r.stdout + r.stderr
    finally:
        fake.close()


def test_scripts_are_executable():
    for name in ("build.sh", "deploy.sh", "start.sh"):
        assert (ROOT / name).stat().st_mode & stat.S_IXUSR, name


def test_compose_file_reserves_a_gpu_uses_workspace_ports_and_an_env_file():
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["comfy-worker"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert service["volumes"] == ["./workspace:/workspace"]
    assert sorted(p.rsplit(":", 1)[1] for p in service["ports"]) == ["8000", "8188", "8888"]
    assert service["env_file"][0]["path"] == ".env"
    assert service["build"]["platforms"] == ["linux/amd64"]
    assert service["environment"]["MODE"] == "${MODE:-pod}"  # published ports need 0.0.0.0


def compose_interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` / `${NAME}` substitution (the forms docker-compose.yml uses)."""
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def compose_ports(env: dict[str, str]) -> dict[str, str]:
    """container port -> the host address it is published on ("" = every interface)."""
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["comfy-worker"]
    out = {}
    for port in service["ports"]:
        parts = compose_interpolate(port, env).split(":")
        out[parts[-1]] = parts[0] if len(parts) == 3 else ""
    return out


def test_compose_publishes_comfyuis_unauthenticated_port_on_loopback_unless_opened():
    """issue 20 (in passing): 8188 (ComfyUI, no authentication) was published on every interface."""
    assert compose_ports({}) == {"8188": "127.0.0.1", "8000": "", "8888": ""}
    assert compose_ports({"COMFY_PUBLISH_ADDR": "0.0.0.0"})["8188"] == "0.0.0.0"
    assert "COMFY_PUBLISH_ADDR" in (ROOT / ".env.example").read_text()
    assert "`COMFY_PUBLISH_ADDR=0.0.0.0`" in (ROOT / "docs" / "image-reference.md").read_text()


def test_env_example_names_only_documented_variables():
    doc = (ROOT / "docs" / "env.md").read_text()
    names = [
        line.lstrip("# ").split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and line.lstrip("# ").split("=", 1)[0].isupper()
    ]
    assert "HF_TOKEN" in names and "CONFIG_YML" in names
    for name in names:
        assert f"`{name}`" in doc, name


def test_dockerignore_keeps_tests_caches_volume_and_env_files_out():
    entries = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".cache", "workspace", "tests", ".git", ".env"):
        assert path in entries, path
