"""Keep the machine's pip/uv configuration out of every test.

Some hosts carry a global pip config (``/etc/pip.conf``, ``/etc/xdg/pip/pip.conf``) with find-links,
extra indexes or a constraint file capping torch, and ``PIP_*``/``UV_*`` variables. A test that runs
pip or uv (directly, or through install_nodes.py, an install.py or a node's requirements) would then
pass on one machine and fail on the next. ``isolate_installers`` drops every such variable and tells
pip (``PIP_CONFIG_FILE=/dev/null`` loads no config file at all) and uv (``UV_NO_CONFIG``) to read none.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# PATH as a new user's plain shell has it: no virtualenv activated, no pyenv shims
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def isolate_installers(environ: MutableMapping[str, str]) -> None:
    for name in [n for n in environ if n.startswith(("PIP_", "UV_"))]:
        del environ[name]
    environ["PIP_CONFIG_FILE"] = os.devnull
    environ["UV_NO_CONFIG"] = "1"
    environ["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
