"""prompt_runner.py: following one prompt over the real ComfyUI websocket; error sentences."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from support.aio import arun
from support.holding_proxy import HoldingProxy

from comfy_worker import prompt_runner
from comfy_worker.comfy_client import ComfyClient
from comfy_worker.job_errors import JobError
from comfy_worker.prompt_runner import PromptRunner, execution_error, rejection_error


def steps_workflow(steps: int, seconds: float) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": random.randrange(1 << 24)},
        },
        "2": {
            "class_type": "WorkerTestSteps",
            "inputs": {"image": ["1", 0], "steps": steps, "seconds_per_step": seconds},
        },
        "3": {"class_type": "PreviewAny", "inputs": {"source": "done"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def runner_for(comfyui, workflow, timeout=30.0, events=None) -> PromptRunner:
    client = ComfyClient(comfyui.host, comfyui.pid_file, comfyui.log_path)
    return PromptRunner(
        client, workflow, timeout=timeout, ready_timeout=10, on_progress=events.append if events is not None else None
    )


def test_outputs_timings_and_progress_events(comfyui):
    events: list[dict] = []
    runner = runner_for(comfyui, steps_workflow(5, 0.05), events=events)
    result = arun(runner.run)
    assert result.outputs["3"] == {"text": ["done"]}
    assert result.outputs["4"]["images"][0]["type"] == "temp"
    assert result.execution_ms >= 200 and result.queue_ms >= 0
    statuses = [e["status"] for e in events]
    assert statuses[0] == "queued" and "running" in statuses
    steps = [e for e in events if e.get("max") == 5]
    assert [e["value"] for e in steps] == [1, 2, 3, 4, 5]
    assert all(e["node_id"] == "2" and e["class_type"] == "WorkerTestSteps" for e in steps)
    assert all(e["prompt_id"] == result.prompt_id and e["nodes_total"] == 4 for e in events)


def test_timeout_while_queued_drops_the_prompt_from_the_queue(comfyui):
    async def go():
        slow = runner_for(comfyui, steps_workflow(20, 0.05), timeout=30)
        waiting = runner_for(comfyui, steps_workflow(1, 0.0), timeout=0.4)
        first = asyncio.create_task(slow.run())
        await asyncio.sleep(0.1)
        try:
            await waiting.run()
        except JobError as exc:
            error = exc
        queue = comfyui.get_json("/queue")
        return await first, error, queue, waiting.prompt_id

    result, error, queue, waiting_id = arun(go)
    assert result.outputs["3"] == {"text": ["done"]}
    assert (
        error.message
        == "The job timed out after 0.4 s while the prompt was still waiting in ComfyUI's queue; the prompt was removed from ComfyUI's queue."
    )
    assert error.details["state"] == "queued"
    assert waiting_id not in str(queue["queue_pending"])
    # a prompt that never ran is only removed from the queue, not interrupted
    assert f"Prompt {waiting_id} is not currently running" not in comfyui.log_path.read_text(errors="replace")


def test_timeout_of_a_prompt_that_does_not_stop_says_comfyui_is_still_finishing_it(comfyui, monkeypatch):
    """issue 21 (the timeout error tells the truth): a node that does not stop mid-step outlives the
    interrupt's grace time; the error must not say "interrupted" (details.stopped is false) but that
    ComfyUI is still finishing the prompt and the next job waits behind it."""
    monkeypatch.setattr(prompt_runner, "INTERRUPT_GRACE_S", 1.0)
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
        "2": {"class_type": "WorkerTestSleep", "inputs": {"image": ["1", 0], "seconds": 6.0}},  # ignores interrupts
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    runner = runner_for(comfyui, workflow, timeout=2.0)

    async def go():
        try:
            await runner.run()
        except JobError as exc:
            return exc, comfyui.get_json("/queue")
        raise AssertionError("the job did not time out")

    error, queue = arun(go)
    try:
        assert error.message == (
            "The job timed out after 2 s while ComfyUI was running node 2 (WorkerTestSleep); ComfyUI was asked to "
            "interrupt the prompt, but it was still running 1 s later (ComfyUI stops a prompt only between nodes "
            "or steps): ComfyUI is still finishing it, and the next job waits behind it."
        )
        assert error.details["stopped"] is False and error.details["state"] == "running"
        assert runner.prompt_id in str(queue["queue_running"])  # what the message says: still running
    finally:  # the next test must not wait behind it
        deadline = time.monotonic() + 60
        while comfyui.get_json("/queue")["queue_running"] and time.monotonic() < deadline:
            time.sleep(0.2)
    status = comfyui.get_json(f"/history/{runner.prompt_id}")[runner.prompt_id]["status"]
    assert "execution_interrupted" in [m[0] for m in status["messages"]]  # it did stop, once the node ended


def test_rejection_error_for_value_not_in_list_both_combo_forms():
    body = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "4": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": "ckpt_name: 'x.safetensors' not in ['a.safetensors', 'b.safetensors']",
                        "extra_info": {
                            "input_name": "ckpt_name",
                            "input_config": [["a.safetensors", "b.safetensors"], {}],
                            "received_value": "x.safetensors",
                        },
                    }
                ],
                "class_type": "CheckpointLoaderSimple",
            },
            "7": {
                "errors": [
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "extra_info": {
                            "input_name": "sampler",
                            "input_config": ["COMBO", {"options": ["euler"]}],
                            "received_value": "nope",
                        },
                    }
                ],
                "class_type": "KSampler",
            },
        },
    }
    err = rejection_error(body, {})
    assert err.message == (
        "ComfyUI rejected the workflow: node 4 (CheckpointLoaderSimple) input 'ckpt_name': 'x.safetensors' is not "
        "one of the values ComfyUI offers (available: 'a.safetensors', 'b.safetensors') "
        "(and 1 more problem(s), see details)."
    )
    assert err.details["problems"][1]["available_values"] == ["euler"]


def test_rejection_error_without_node_errors():
    body = {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node Foo does not exist.",
            "details": "Node ID '#1'",
        }
    }
    err = rejection_error(body, {})
    assert (
        err.message == "ComfyUI rejected the workflow: Cannot execute because node Foo does not exist.: Node ID '#1'."
    )


def test_execution_error_sentence_and_details():
    err = execution_error(
        {
            "prompt_id": "p",
            "node_id": "5",
            "node_type": "KSampler",
            "exception_type": "torch.OutOfMemoryError",
            "exception_message": "CUDA out of memory.\n",
            "traceback": [f"line {i}" for i in range(20)],
            "executed": ["1"],
        }
    )
    assert err.message == "ComfyUI failed in node 5 (KSampler): torch.OutOfMemoryError: CUDA out of memory."
    assert err.details["traceback"] == [f"line {i}" for i in range(12, 20)]
    assert err.details["class_type"] == "KSampler"


def test_interrupt_from_elsewhere_ends_the_job_at_once(comfyui):
    import json
    import urllib.request

    async def go():
        runner = runner_for(comfyui, steps_workflow(100, 0.05), timeout=60)
        task = asyncio.create_task(runner.run())
        while not runner.started:
            await asyncio.sleep(0.02)
        req = urllib.request.Request(f"{comfyui.url}/interrupt", data=json.dumps({}).encode(), method="POST")
        await asyncio.to_thread(urllib.request.urlopen, req)
        try:
            await task
        except JobError as exc:
            return exc

    error = arun(go)
    assert error.message.startswith("The prompt was interrupted in ComfyUI at node 2 (WorkerTestSteps)")
    assert error.details["node_id"] == "2" and error.details["class_type"] == "WorkerTestSteps"


def test_a_queued_prompt_deleted_by_someone_else_is_reported_as_removed(comfyui):
    import json
    import time
    import urllib.request

    async def go():
        slow = runner_for(comfyui, steps_workflow(20, 0.05), timeout=30)
        waiting = runner_for(comfyui, steps_workflow(1, 0.0), timeout=30)
        first = asyncio.create_task(slow.run())
        await asyncio.sleep(0.1)
        second = asyncio.create_task(waiting.run())
        while waiting.prompt_id not in str(comfyui.get_json("/queue")["queue_pending"]):
            await asyncio.sleep(0.02)
        body = json.dumps({"delete": [waiting.prompt_id]}).encode()
        req = urllib.request.Request(f"{comfyui.url}/queue", data=body, method="POST")
        await asyncio.to_thread(urllib.request.urlopen, req)
        started = time.monotonic()
        try:
            await second
        except JobError as exc:
            error = exc
        return await first, error, time.monotonic() - started

    result, error, elapsed = arun(go)
    assert result.outputs["3"] == {"text": ["done"]}
    assert error.message == (
        "The prompt was removed from ComfyUI's queue before it ran, not by this job (was the queue cleared, "
        "or the prompt deleted with POST /queue, by someone else?)."
    )
    assert error.details["state"] == "removed" and elapsed < 5  # not its 30 s timeout


def test_closing_the_websocket_never_waits_for_a_peer_that_does_not_answer_the_close(tmp_path):
    """issue 20 #15: a ComfyUI that does not answer the closing handshake held each job 10 s (the
    websocket library's default close timeout) in ``PromptRunner.close()``; the close now returns at once
    and the connection is still ended, by this side, within a few seconds."""
    import time

    from support.silent_ws import SilentWebSocketPeer

    with SilentWebSocketPeer() as peer:
        client = ComfyClient(peer.host, tmp_path / "absent.pid", tmp_path / "absent.log")
        runner = PromptRunner(client, {}, timeout=30, ready_timeout=5)

        async def go():
            await runner.open()
            started = time.monotonic()
            await runner.close()
            took = time.monotonic() - started
            deadline = time.monotonic() + 10
            while not peer.closed_at and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return started, took

        started, took = arun(go)
        assert took < 0.5, took
        assert peer.received.startswith(b"\x88")  # the close frame was sent (masked, from the client)
        assert peer.closed_at and peer.closed_at[0] - started < 5  # and the connection ended from this side


async def _timed_following_prompt(comfyui):
    """A one-step prompt queued next, with how long it took (it must not wait behind a stopped one)."""
    following = runner_for(comfyui, steps_workflow(1, 0.0))
    started = time.monotonic()
    result = await following.run()
    return result, time.monotonic() - started


def _not_run_to_the_end(comfyui, prompt_id: str) -> None:
    """``prompt_id`` is neither queued nor running in ComfyUI, and did not run to its end."""
    queue = comfyui.get_json("/queue")
    assert prompt_id not in str(queue["queue_running"]) + str(queue["queue_pending"])
    entry = comfyui.get_json(f"/history/{prompt_id}").get(prompt_id)
    if entry is not None:  # it had started: it was interrupted
        assert "execution_success" not in [m[0] for m in entry["status"]["messages"]]


def test_a_job_cancelled_while_its_prompt_is_on_its_way_to_comfyui_removes_it_once_queued(comfyui):
    """The cancellation comes while POST /prompt is in flight (held by a proxy until the abort has begun):
    ComfyUI queues the prompt after the job ended. It must not run to its end in front of the next job."""
    proxy = HoldingProxy(comfyui.port, b"POST /prompt").start()
    client = ComfyClient(proxy.host, comfyui.pid_file, comfyui.log_path)
    cancelled = PromptRunner(client, steps_workflow(100, 0.1), timeout=60, ready_timeout=10)  # 10 s unless stopped

    async def go():
        task = asyncio.create_task(cancelled.run())
        await asyncio.to_thread(proxy.wait_held)
        task.cancel()
        await asyncio.sleep(0.2)  # the abort has begun (and, before the fix, ended) with the POST still held
        proxy.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert proxy.forwarded == 1  # ComfyUI did get the prompt after the cancellation
        _not_run_to_the_end(comfyui, cancelled.prompt_id)
        return await _timed_following_prompt(comfyui)

    try:
        result, elapsed = arun(go)
    finally:
        proxy.stop()
    assert result.outputs["3"] == {"text": ["done"]}
    assert elapsed < 5  # not behind the cancelled prompt's 10 s
    _not_run_to_the_end(comfyui, cancelled.prompt_id)


def test_a_job_cancelled_just_before_its_prompt_is_sent_never_sends_it(comfyui):
    """The cancellation arrives as the prompt is about to be sent (``on_queue``, where the API learns the
    prompt id): no POST /prompt is sent; an aborted runner never sends one either."""
    proxy = HoldingProxy(comfyui.port, b"POST /prompt").start()
    client = ComfyClient(proxy.host, comfyui.pid_file, comfyui.log_path)
    workflow = steps_workflow(1, 0.0)
    cancelled = PromptRunner(client, workflow, timeout=30, ready_timeout=10, on_queue=lambda: task.cancel())
    aborted = PromptRunner(client, steps_workflow(1, 0.0), timeout=30, ready_timeout=10)

    async def go():
        nonlocal task
        task = asyncio.create_task(cancelled.run())
        with pytest.raises(asyncio.CancelledError):
            await task
        await aborted.abort()
        with pytest.raises(asyncio.CancelledError):
            await aborted.run()

    task = None
    try:
        arun(go)
    finally:
        proxy.stop()
    assert proxy.held == 0  # no POST /prompt reached the proxy
    assert task.cancelled() and cancelled.post is None and aborted.post is None
    for runner in (cancelled, aborted):
        assert comfyui.get_json(f"/history/{runner.prompt_id}") == {}


def test_a_job_whose_deadline_passes_while_its_prompt_is_on_its_way_removes_it_once_comfyui_answers(comfyui):
    """A ComfyUI that does not answer POST /prompt before the job's deadline fails the job then, and the
    prompt, queued once ComfyUI answers, is removed in the background (not run to its end)."""
    proxy = HoldingProxy(comfyui.port, b"POST /prompt").start()
    client = ComfyClient(proxy.host, comfyui.pid_file, comfyui.log_path)
    late = PromptRunner(client, steps_workflow(100, 0.1), timeout=0.5, ready_timeout=10)

    async def go():
        with pytest.raises(TimeoutError):
            await late.run()
        proxy.release()
        deadline = time.monotonic() + 20
        while not proxy.forwarded and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*prompt_runner._follow_ups), 20)
        return await _timed_following_prompt(comfyui)

    try:
        result, elapsed = arun(go)
    finally:
        proxy.stop()
    assert proxy.forwarded == 1  # ComfyUI did get the prompt after the job ended
    assert result.outputs["3"] == {"text": ["done"]}
    assert elapsed < 5  # not behind the late prompt's 10 s
    _not_run_to_the_end(comfyui, late.prompt_id)
