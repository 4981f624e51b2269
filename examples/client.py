"""Submit a job with /run, poll /status until it ends, save the outputs.

    python examples/client.py examples/quickstart.json                                  # local box
    python examples/client.py examples/quickstart.json --url https://<pod id>-8000.proxy.runpod.net --token "$API_TOKEN"
    python examples/client.py examples/quickstart.json --url https://api.runpod.ai/v2/<endpoint id> --token "$RUNPOD_API_KEY"

The same routes answer on the three: the worker's own API on a local box or a pod (``API_PORT``, 8000)
and a RunPod serverless endpoint. ``--token`` is sent as ``Authorization: Bearer <token>``: the pod's
``API_TOKEN`` (printed once at its first start, kept in ``$VOLUME_ROOT/.api-token``), or your RunPod
API key for an endpoint. A local box listening on 127.0.0.1 asks for none.

Unlike ``/runsync``, this never holds one HTTP request open for the whole job, so long video jobs and
RunPod's cold starts are fine. Images and files go to ``--out`` (base64 decoded, or downloaded from
their S3 URL); text outputs and non-fatal errors are printed. Exit 0 when the job completed; 1 when it
did not, or when the API refused the request (its own error is printed, e.g. a missing or wrong token).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import requests

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


class ApiRefused(Exception):
    """The API answered with an error status, or could not be reached; the message says which and why."""


def api_call(session: requests.Session, method: str, url: str, **kwargs) -> dict:
    """One request; its JSON answer, or ``ApiRefused`` carrying the API's own error sentence."""
    try:
        resp = session.request(method, url, **kwargs)
    except requests.RequestException as exc:
        raise ApiRefused(f"cannot reach {url.split('?')[0]}: {type(exc).__name__}") from None
    if resp.ok:
        return resp.json()
    try:
        message = resp.json().get("error") or resp.text
    except ValueError:
        message = resp.text.strip()[:500] or resp.reason
    if resp.status_code == 429:
        message += f" (retry after {resp.headers.get('Retry-After', '?')} s)"
    raise ApiRefused(f"the API answered {resp.status_code}: {message}")


def submit(session: requests.Session, url: str, body: dict) -> str:
    answer = api_call(session, "POST", f"{url}/run", json=body, timeout=60)
    print(f"job {answer['id']}: {answer.get('status')}")
    return answer["id"]


def wait(session: requests.Session, url: str, job_id: str, poll: float, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        answer = api_call(session, "GET", f"{url}/status/{job_id}", timeout=60)
        status = answer.get("status")
        if status != last:
            print(f"job {job_id}: {status}")
            last = status
        if status in FINAL:
            return answer
        if time.monotonic() > deadline:
            session.post(f"{url}/cancel/{job_id}", timeout=60)
            raise SystemExit(f"job {job_id} did not end within {timeout:g} s: cancelled")
        time.sleep(poll)


def save_outputs(output: dict, out_dir: Path, timeout: float = 300) -> list[Path]:
    """Write the job's images and files into ``out_dir``: base64 decoded, or downloaded from their URL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for entry in output.get("images", []) + output.get("files", []):
        target = out_dir / Path(entry["filename"]).name
        if entry["type"] == "base64":
            target.write_bytes(base64.b64decode(entry["data"]))
        else:  # s3_url: a presigned (or public) URL
            resp = requests.get(entry["data"], timeout=timeout)
            resp.raise_for_status()
            target.write_bytes(resp.content)
        saved.append(target)
    return saved


def show_output(output: dict, out_dir: Path, download_timeout: float = 300) -> None:
    """Save the outputs (``save_outputs``), print text outputs and non-fatal errors."""
    for path in save_outputs(output, out_dir, download_timeout):
        print(f"saved {path}")
    for text in output.get("text", []):
        print(f"text from node {text['node_id']}: {text['text']}")
    for error in output.get("errors", []):
        print(f"warning: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Submit a job with /run, poll /status, save the outputs.")
    parser.add_argument("request", type=Path, help='request JSON file: {"input": {"workflow": ...}}')
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="API base URL (default: the local box)")
    parser.add_argument(
        "--token", default=os.environ.get("API_TOKEN"), help="bearer token (default: env API_TOKEN, if set)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the returned files")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between /status requests")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the job is cancelled")
    args = parser.parse_args(argv)

    body = json.loads(args.request.read_text())
    url = args.url.rstrip("/")
    session = requests.Session()
    if args.token:
        session.headers["Authorization"] = f"Bearer {args.token}"
    try:
        answer = wait(session, url, submit(session, url, body), args.poll, args.timeout)
    except ApiRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if answer["status"] != "COMPLETED":
        print(f"error: {answer.get('error')}", file=sys.stderr)
        details = (answer.get("output") or {}).get("details")
        if details:
            print(json.dumps(details, indent=2)[:4000], file=sys.stderr)
        return 1
    show_output(answer["output"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
