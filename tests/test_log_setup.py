"""log_setup: one format, a job-id prefix, secrets never printed."""

import io
import logging

from comfy_worker.log_setup import reset_job_id, set_job_id, setup_logging


def test_job_prefix_and_secret_redaction(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    setup_logging(stream=io.StringIO())  # configured before (as by an earlier module): the new stream wins
    stream = io.StringIO()
    setup_logging(stream=stream)
    try:
        log = logging.getLogger("comfy-worker.test")
        token = set_job_id("job-42")
        log.info("downloading with token %s", "hf_abcdefgh123")
        reset_job_id(token)
        log.info("no job here")
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_comfy_worker", False)]:
            root.removeHandler(h)
    first, second = stream.getvalue().splitlines()
    assert " INFO comfy-worker.test: [job-42] downloading with token ***" in first
    assert "hf_abcdefgh123" not in stream.getvalue()
    assert second.endswith("INFO comfy-worker.test: no job here")


def test_redact_removes_longest_secrets_first_and_ignores_tiny_ones():
    from comfy_worker.log_setup import redact

    assert redact("key=abcd1234 short=abcd", ["abcd", "abcd1234"]) == "key=*** short=***"
    assert redact("a b c", ["a", ""]) == "a b c"  # under 4 characters: would mangle every message


def test_a_traceback_another_handler_formatted_first_is_redacted_too(monkeypatch):
    """pytest's log capture (or the RunPod SDK's own handler) may format the record before ours."""
    monkeypatch.setenv("HF_TOKEN", "hf_traceback_secret")
    ours, theirs = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    first = logging.StreamHandler(theirs)
    first.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(first)
    root.handlers.insert(0, root.handlers.pop())  # the other handler runs before ours
    try:
        setup_logging(stream=ours)
        try:
            raise RuntimeError("token hf_traceback_secret rejected")
        except RuntimeError:
            logging.getLogger("x").exception("failed")
    finally:
        root.removeHandler(first)
    assert "hf_traceback_secret" in theirs.getvalue()  # that handler formatted it unredacted first
    assert "token *** rejected" in ours.getvalue() and "hf_traceback_secret" not in ours.getvalue()


def test_a_path_quoted_with_its_query_by_a_library_is_redacted():
    from comfy_worker.log_setup import redact

    text = "Max retries exceeded with url: /m.bin?X-Amz-Signature=SIGNEDsecret42 (Caused by ...)"
    assert redact(text) == "Max retries exceeded with url: /m.bin?… (Caused by ...)"
    assert redact("see https://cdn.x/a/b.safetensors?sig=abc.") == "see https://cdn.x/a/b.safetensors?…."
