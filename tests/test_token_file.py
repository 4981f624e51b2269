"""token_file: one generated token per file, 0600, even when many workers start at once."""

import stat
import subprocess
import sys
from pathlib import Path

from comfy_worker.token_file import stored_token

ROOT = Path(__file__).resolve().parents[1]


def test_a_token_is_created_once_0600_and_read_back(tmp_path):
    path = tmp_path / "volume" / ".api-token"
    token, created = stored_token(path)
    assert created and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stored_token(path) == (token, False)


def test_workers_starting_at_once_all_get_the_same_token(tmp_path):
    path = tmp_path / ".jupyter-token"
    code = "import sys; from pathlib import Path; from comfy_worker.token_file import stored_token; "
    code += "print(stored_token(Path(sys.argv[1]))[0])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    tokens = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert len(tokens) == 1 and tokens == {path.read_text().strip()}
