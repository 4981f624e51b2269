#!/usr/bin/env python3
"""Check workflows against config.yml: does the config provide every model file (in the folder its
loader reads) and every custom node they need? ``--suggest`` prints the config.yml entries to add.

    python check_workflow.py WORKFLOW... [--config PATH] [--comfy-host H] [--suggest] [--json]

The logic is comfy_worker/workflow_check.py; the guide is docs/check_workflow.md.
"""

import sys

try:
    from comfy_worker.workflow_check import main
except ModuleNotFoundError as missing:  # started with a Python that lacks the project's packages
    from comfy_worker.project_python import run_again

    run_again(missing)

if __name__ == "__main__":
    sys.exit(main())
