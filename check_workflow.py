#!/usr/bin/env python3
"""Check workflows against config.yml: does the config provide every model file (in the folder its
loader reads) and every custom node they need? ``--suggest`` prints the config.yml entries to add.

    python check_workflow.py WORKFLOW... [--config PATH] [--comfy-host H] [--suggest] [--json]

The logic is comfy_worker/workflow_check.py; the guide is docs/check_workflow.md.
"""

import sys

from comfy_worker.workflow_check import main

if __name__ == "__main__":
    sys.exit(main())
