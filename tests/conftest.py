"""Shared fixtures: a real ComfyUI on CPU, the 10 KB upscale model, local git repos."""

from __future__ import annotations

import os

import pytest
from support.comfy_process import ComfyUIProcess, clone_comfyui
from support.gitrepos import GitRepoFactory
from support.hermetic import isolate_installers
from support.models import UPSCALE_MODEL_NAME, make_upscale_model
from support.origins import FaultyOrigin

isolate_installers(os.environ)  # before any test starts pip or uv (support/hermetic.py says why)


@pytest.fixture(scope="session")
def upscale_model_file(tmp_path_factory):
    """A real 10 KB upscale model (.safetensors) in a temp folder."""
    return make_upscale_model(tmp_path_factory.mktemp("model") / UPSCALE_MODEL_NAME)


@pytest.fixture(scope="session")
def _comfyui_session(tmp_path_factory, upscale_model_file):
    base = tmp_path_factory.mktemp("comfyui")
    path = clone_comfyui(base / "ComfyUI")
    (path / "models" / "upscale_models" / UPSCALE_MODEL_NAME).write_bytes(upscale_model_file.read_bytes())
    proc = ComfyUIProcess(path, base / "run")
    proc.install_test_nodes()
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def comfyui(_comfyui_session, request):
    """The shared real ComfyUI (restarted if a previous test killed it). Its log is attached to
    the report of a failing test."""
    proc = _comfyui_session.ensure_running()
    request.node._comfyui = proc
    return proc


@pytest.fixture
def comfyui_factory(tmp_path):
    """Start extra ComfyUI instances (own checkout) for tests that need a private one."""
    started: list[ComfyUIProcess] = []

    def make(path=None, start=True) -> ComfyUIProcess:
        path = path or clone_comfyui(tmp_path / f"ComfyUI-{len(started)}")
        proc = ComfyUIProcess(path, tmp_path / f"run-{len(started)}")
        started.append(proc)
        if start:
            proc.start()
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture
def origin():
    """A fault-injecting local HTTP origin (tests/support/origins.py)."""
    with FaultyOrigin() as o:
        yield o


@pytest.fixture
def git_repos(tmp_path):
    """Factory for local git repos with tags, branches and submodules (``git_repos.create(name)``)."""
    return GitRepoFactory(tmp_path / "git")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    proc = getattr(item, "_comfyui", None)
    if proc is not None and report.failed:
        report.sections.append(("ComfyUI log (tail)", proc.log_tail()))
