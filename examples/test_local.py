"""Send a job to the worker's local API and save what comes back.

    python examples/test_local.py                              # test_input.json to http://127.0.0.1:8000
    python examples/test_local.py examples/workflow_upscale.json --url http://127.0.0.1:8000 --out outputs

The API is the worker's own (``python -m comfy_worker.api``, started by start.sh in local and pod
mode; docs/api.md). ``--token`` (default: env ``API_TOKEN``) is sent as ``Authorization: Bearer``, as a
pod's API asks; a refused request prints the API's own error and exits 1.
The request file is a RunPod request body: ``{"input": {"workflow": ...}}``.
Images and files are written to ``--out`` (base64 decoded, or downloaded from their S3 URL); text
outputs and non-fatal errors are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import requests
from client import ApiRefused, api_call, show_output  # examples/client.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send a job to the local API and save the outputs.")
    parser.add_argument("request", nargs="?", type=Path, default=ROOT / "test_input.json", help="request JSON file")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="local API base URL")
    parser.add_argument(
        "--token", default=os.environ.get("API_TOKEN"), help="bearer token (default: env API_TOKEN, if set)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the returned files")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the answer")
    args = parser.parse_args(argv)

    body = json.loads(args.request.read_text())
    session = requests.Session()
    if args.token:
        session.headers["Authorization"] = f"Bearer {args.token}"
    try:
        answer = api_call(session, "POST", f"{args.url.rstrip('/')}/runsync", json=body, timeout=args.timeout)
    except ApiRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if answer.get("status") != "COMPLETED":
        print(f"Job {answer.get('id')} {answer.get('status')}: {answer.get('error')}", file=sys.stderr)
        return 1
    output = answer["output"]
    show_output(output, args.out, download_timeout=120)
    if "timings" in output:
        print("timings: " + ", ".join(f"{k} {v}" for k, v in output["timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
