"""The names of the files provisioning leaves behind to find its work done (docs/architecture.md,
"On-disk formats"). One place, because the warm start (provision.py) reads what the installers write
without importing them (they are slow to import)."""

# on the volume
GATE = ".config-sha256"  # the config's digest, written only once every required entry is ready
GATE_RECORD = ".config-sha256.json"  # what the gate's digest covered (provision.py)
PROVISION_LOCK = ".provision.lock"  # held while a worker provisions the volume
# the models jobs fetched (job_models.py): JSON {"version": 1, "models": {"<destination>/<filename>":
# {"url", "sha256", "size" (bytes it takes on the volume: 0 for a link to a cached model), "added",
# "last_used" (Unix seconds)}}, "downloads": {"<destination>/<filename>": {"url", "size" (the bytes expected,
# null when the server tells none), "started", "touched" (Unix seconds)}}}: a job model being downloaded, or
# whose download was cut (its <filename>.part left, deleted first when the bound needs room once nobody holds
# its download lock), recorded before the first byte; replaced atomically, only while JOB_MODELS_LOCK is held
JOB_MODELS_STATE = ".job-models.json"
JOB_MODELS_LOCK = ".job-models.lock"

# inside a node's git dir: install_nodes.py's state of that node (the commit it installed, its requirements)
NODE_STATE = "comfy-worker-node.json"

# inside a Python environment (its prefix): what was installed into it
NODE_REQUIREMENTS_RECORD = "comfy-worker-node-requirements.json"  # node_requirements.py
COMFYUI_REQUIREMENTS_RECORD = "comfy-worker-comfyui-requirements.json"  # comfyui_checkout.py
