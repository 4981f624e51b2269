"""job_runner: the API's jobs in a child process of their own, over its line protocol (a real process
running a small handler written for the test; tests/test_api.py runs it with the real handler)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time

import pytest
from support.comfy_process import ROOT

from comfy_worker.job_runner import EXPIRED, RunnerDied, RunnerProcess, parse_message

HANDLER = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path

    async def handler(job):
        inp = job["input"]
        if inp.get("show_job"):
            return {"job": job}
        print("a stray print on stdout", flush=True)  # must not reach the protocol
        os.write(1, b"and a raw write to fd 1\\n")
        marks = Path(inp.get("marks", os.devnull))
        if "prompt_id" in inp:
            from comfy_worker.job_runner import report_prompt

            report_prompt(inp["prompt_id"], 1700000000.5, ["in-1.png"])
        try:
            await asyncio.sleep(inp.get("sleep", 0))
        except asyncio.CancelledError:
            with marks.open("a") as f:
                f.write(f"cancelled {job['id']}\\n")
            raise
        return {"echo": inp.get("value"), "pid": os.getpid()}
""")


@pytest.fixture
def runner_env(tmp_path, monkeypatch):
    """APP_DIR holding ``test_handler.py``; the runner inherits this environment."""
    (tmp_path / "test_handler.py").write_text(HANDLER)
    (tmp_path / "broken_handler.py").write_text("raise ImportError('no module named torch_extras')\n")
    monkeypatch.setenv("APP_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started_runner(concurrency: int = 1, handler: str = "test_handler:handler") -> RunnerProcess:
    runner = RunnerProcess(handler, concurrency)
    starts: list[tuple[str, float]] = []
    runner.on_started = lambda job_id, at: starts.append((job_id, at))
    runner.starts = starts
    await runner.attach()
    return runner


def test_jobs_start_in_order_within_the_concurrency_and_stray_prints_do_not_break_the_protocol(runner_env):
    async def go():
        runner = await started_runner(concurrency=1)
        jobs = [runner.run({"id": f"j{i}", "input": {"value": i, "sleep": 0.2}}) for i in range(3)]
        outputs = await asyncio.gather(*jobs)
        await runner.close(10)
        return runner, outputs

    runner, outputs = run(go())
    assert [o["echo"] for o in outputs] == [0, 1, 2]
    assert outputs[0]["pid"] == runner.proc.pid  # the jobs ran in the child process
    assert [job_id for job_id, _ in runner.starts] == ["j0", "j1", "j2"]
    gaps = [b - a for (_, a), (_, b) in zip(runner.starts, runner.starts[1:], strict=False)]
    assert all(gap >= 0.19 for gap in gaps), gaps  # one at a time: each started when the one before ended


def test_two_at_once_with_concurrency_2(runner_env):
    async def go():
        runner = await started_runner(concurrency=2)
        started = time.monotonic()
        await asyncio.gather(*(runner.run({"id": f"j{i}", "input": {"sleep": 0.5}}) for i in range(2)))
        took = time.monotonic() - started
        await runner.close(10)
        return took

    assert run(go()) < 0.9


def test_cancel_drops_a_waiting_job_unstarted_and_stops_a_running_one(runner_env):
    marks = runner_env / "marks.txt"

    async def go():
        runner = await started_runner()
        running = asyncio.create_task(runner.run({"id": "slow", "input": {"sleep": 30, "marks": str(marks)}}))
        waiting = asyncio.create_task(runner.run({"id": "next", "input": {"value": 1, "marks": str(marks)}}))
        while not runner.starts:
            await asyncio.sleep(0.01)
        runner.cancel("next")
        assert await waiting is None
        runner.cancel("slow")
        assert await running is None
        await runner.close(10)
        return runner

    runner = run(go())
    assert [job_id for job_id, _ in runner.starts] == ["slow"]  # "next" never started
    assert marks.read_text() == "cancelled slow\n"


def test_a_job_not_started_by_its_not_after_ends_expired(runner_env):
    async def go():
        runner = await started_runner()
        first = asyncio.create_task(runner.run({"id": "first", "input": {"sleep": 0.5}}))
        while not runner.starts:
            await asyncio.sleep(0.01)
        late = await runner.run({"id": "late", "input": {}}, not_after=time.time() + 0.1)
        fresh = await runner.run({"id": "fresh", "input": {"value": 2}}, not_after=time.time() + 60)
        await first
        await runner.close(10)
        return runner, late, fresh

    runner, late, fresh = run(go())
    assert late is EXPIRED and fresh["echo"] == 2
    assert [job_id for job_id, _ in runner.starts] == ["first", "fresh"]


def test_the_pipe_closing_cancels_the_running_jobs_and_the_runner_exits(runner_env):
    """What happens when the API dies (even by SIGKILL): its end of the pipe closes."""
    marks = runner_env / "marks.txt"

    async def go():
        runner = await started_runner()
        task = asyncio.create_task(runner.run({"id": "slow", "input": {"sleep": 30, "marks": str(marks)}}))
        while not runner.starts:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        code = await runner.close(10)
        task.cancel()
        return code, time.monotonic() - started

    code, took = run(go())
    assert code == 0 and took < 5
    assert marks.read_text() == "cancelled slow\n"


def test_sigterm_and_sigint_are_left_to_the_api(runner_env):
    async def go():
        runner = await started_runner()
        task = asyncio.create_task(runner.run({"id": "j", "input": {"sleep": 0.5, "value": 7}}))
        while not runner.starts:
            await asyncio.sleep(0.01)
        runner.proc.send_signal(signal.SIGTERM)
        runner.proc.send_signal(signal.SIGINT)
        output = await task
        await runner.close(10)
        return output

    assert run(go())["echo"] == 7


def test_a_runner_that_dies_fails_its_running_job_and_says_whether_it_had_started(runner_env):
    async def go():
        runner = await started_runner()
        exits = []
        runner.on_exit = lambda: exits.append(True)
        running = asyncio.create_task(runner.run({"id": "slow", "input": {"sleep": 30}}))
        waiting = asyncio.create_task(runner.run({"id": "next", "input": {}}))
        while not runner.starts:
            await asyncio.sleep(0.01)
        os.kill(runner.proc.pid, signal.SIGKILL)
        results = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(RunnerDied, match="not running"):
            await runner.run({"id": "after", "input": {}})
        return exits, results

    exits, (running, waiting) = run(go())
    assert exits == [True]
    assert isinstance(running, RunnerDied) and running.started and "exit code -9" in str(running)
    assert isinstance(waiting, RunnerDied) and not waiting.started


def test_a_handler_that_cannot_be_imported_stops_the_start_with_its_error(runner_env, capfd):
    async def go():
        runner = RunnerProcess("broken_handler:handler")
        with pytest.raises(RunnerDied, match=r"did not start \(exit code 1\)"):
            await runner.attach()

    run(go())
    assert "no module named torch_extras" in capfd.readouterr().err


def test_a_malformed_line_is_logged_and_skipped_on_both_sides(runner_env, caplog):
    assert parse_message(b"[1, 2]\n") == {} and parse_message(b"\x00garbage\n") == {}
    assert "ignoring a malformed line (7 bytes)" in caplog.text

    async def go():
        runner = await started_runner()
        runner.writer.write(b"this is not json\n")
        output = await runner.run({"id": "after", "input": {"value": 3}})
        await runner.close(10)
        return output

    assert run(go())["echo"] == 3


def test_a_jobs_prompt_reaches_the_api_before_the_job_ends(runner_env):
    """issue 20 #17: the handler's ``report_prompt`` (called just before it queues a ComfyUI prompt) is the
    protocol's ``prompt`` message, so the API can stop that prompt should the runner die."""

    async def go():
        runner = await started_runner()
        prompts: list[tuple[str, dict, bool]] = []
        runner.on_prompt = lambda job_id, prompt: prompts.append((job_id, prompt, job_id in runner.pending))
        output = await runner.run({"id": "j", "input": {"prompt_id": "p-1", "value": 1}})
        await runner.close(10)
        return prompts, output

    prompts, output = run(go())
    assert output["echo"] == 1
    ((job_id, prompt, running),) = prompts
    assert job_id == "j" and running  # told while the job ran
    assert prompt == {"prompt": "j", "prompt_id": "p-1", "queued_at": 1700000000.5, "inputs": ["in-1.png"]}


def test_a_request_the_api_encoded_is_sent_as_it_is_with_the_jobs_id(runner_env):
    """``run(job, not_after, encoded)``: the request's JSON text goes into the message unchanged, the id put
    in front; the handler gets the request's members (``s3Config``, ``policy``) with the id."""
    request = {"input": {"show_job": True, "text": 'a "quoted"\nline, é'}, "s3Config": {"bucketName": "b"}}
    request["policy"] = {"ttl": 60000}

    async def go():
        runner = await started_runner()
        try:
            return await runner.run({"id": "j-1"}, time.time() + 60, json.dumps(request))
        finally:
            await runner.close(10)

    assert run(go()) == {"job": {"id": "j-1", **request}}
