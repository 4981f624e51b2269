"""The exit codes of the provisioning scripts (download_models.py, install_nodes.py, start.sh's
provisioning): 0 every required entry is ready, 1 one failed, 2 the config or the environment is invalid."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
