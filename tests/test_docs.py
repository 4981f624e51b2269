"""The docs promise only what exists: every command, script flag, environment variable, file path and
link quoted in README.md and docs/*.md, and every example request the handler would accept.

What is read is what the files hold when the test runs (a doc or a setting added later is checked
then). How each kind of quote is recognised:
- code: fenced blocks and `inline spans`; a line's `# comment` is dropped;
- env var: an upper-case name with an underscore inside a code span or block (`HF_TOKEN`,
  `$VOLUME_ROOT`, `NAME=value`); it must be one settings.py reads, a documented secret, a build
  argument or variable of the Dockerfile and the shell scripts, a name the Python code sets for its
  children (a quoted literal), or one of EXTERNAL below;
- flag: a `-x`/`--xx` word after a known script or module (SCRIPTS); it must appear in that script's
  --help (or, for handler.py, in the RunPod SDK's argument list);
- path: a code span whose first part is a top-level entry of the repo (`docs/x.md`, `examples/`),
  or `/app/<x>` (the repo inside the image), and every relative markdown link (with its #anchor).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from support.node_data import NodeDataServer

from comfy_worker import config_schema
from comfy_worker.job_input import apply_overrides, parse_job_input
from comfy_worker.settings import SECRET_ENV_NAMES, SECRET_PREFIXES

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Names the docs may quote that comfy-worker does not read, and why.
EXTERNAL = {
    "CUDA_VISIBLE_DEVICES": "the CUDA runtime's; an empty one means no GPU (services.py)",
    "PIP_CACHE_DIR": "pip's own; wins over NODE_PACKAGE_CACHE",
    "UV_CACHE_DIR": "uv's own; wins over NODE_PACKAGE_CACHE",
    "OUTPUT_NODE": "an attribute of ComfyUI node classes, not a variable",
    "IN_QUEUE": "a job status (RunPod's), not a variable",
    "IN_PROGRESS": "a job status (RunPod's), not a variable",
    "TIMED_OUT": "a job status (RunPod's), not a variable",
}
EXTERNAL_PREFIXES = ("PIP_", "UV_", "AWS_", "RUNPOD_SECRET_")  # pip's, uv's, boto3's, RunPod's secret refs

# script or module -> the command whose output lists its flags (None: flags are not ours to check)
SCRIPTS: dict[str, list[str] | None] = {
    "start.sh": ["bash", "start.sh", "--help"],
    "scripts/dev.sh": ["bash", "start.sh", "--help"],  # extra arguments go to start.sh
    "scripts/test.sh": None,  # extra arguments go to pytest
    "apply_config.sh": ["bash", "apply_config.sh", "--help"],
    "build.sh": ["bash", "build.sh", "--help"],
    "deploy.sh": ["bash", "deploy.sh", "--help"],
    "download_models.py": [PY, "download_models.py", "--help"],
    "install_nodes.py": [PY, "install_nodes.py", "--help"],
    "check_workflow.py": [PY, "check_workflow.py", "--help"],
    "examples/test_local.py": [PY, "examples/test_local.py", "--help"],
    "examples/client.py": [PY, "examples/client.py", "--help"],
    "comfy_worker.api": [PY, "-m", "comfy_worker.api", "--help"],
    "comfy_worker.provision": [PY, "-m", "comfy_worker.provision", "--help"],
    "comfy_worker.config_schema": [PY, "-m", "comfy_worker.config_schema"],  # prints its usage
    "comfy_worker.settings": [PY, "-m", "comfy_worker.settings"],  # prints its usage
    "handler.py": ["runpod-sdk"],  # the RunPod SDK parses handler.py's arguments
}
ENV_NAME = re.compile(r"(?<![\w./-])\$?\{?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]


def code_lines(text: str) -> list[str]:
    """Every line of every fenced block, then every inline span outside the blocks."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.splitlines()
    lines += SPAN.findall(FENCE.sub("", text))
    return lines


def strip_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#(?:\s|$)", line, maxsplit=1)[0]


# ---- what exists ---------------------------------------------------------------------------------
@functools.cache
def known_env_names() -> frozenset[str]:
    source = (ROOT / "comfy_worker" / "settings.py").read_text()
    names = set(re.findall(r'env(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', source))
    names |= set(re.findall(r'_(?:int|float|flag|choice)\(env, "([A-Z][A-Z0-9_]+)"', source))
    names |= set(SECRET_ENV_NAMES)
    docker = (ROOT / "Dockerfile").read_text()
    names |= set(re.findall(r"^ARG ([A-Z][A-Z0-9_]+)", docker, re.M))
    names |= set(re.findall(r"^\s*(?:ENV\s+)?([A-Z][A-Z0-9_]+)=", docker, re.M))
    for script in [*ROOT.glob("*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / "docker-compose.yml"]:
        names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", script.read_text()))
    for code in [*ROOT.glob("*.py"), *ROOT.glob("comfy_worker/*.py")]:  # set for child processes (GIT_*)
        names |= set(re.findall(r"[\"']([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)[\"']", code.read_text()))
    return frozenset(names | set(EXTERNAL))


def is_known_env(name: str) -> bool:
    return name in known_env_names() or name.startswith(SECRET_PREFIXES + EXTERNAL_PREFIXES)


@functools.cache
def help_text(script: str) -> str:
    cmd = SCRIPTS[script]
    assert cmd is not None
    if cmd == ["runpod-sdk"]:
        spec = importlib.util.find_spec("runpod")
        return (Path(spec.submodule_search_locations[0]) / "serverless" / "__init__.py").read_text()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


@functools.cache
def top_level_entries() -> frozenset[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return frozenset(line.split("/", 1)[0] for line in files.splitlines()) - {"workspace"}  # the local volume


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    text = FENCE.sub("", path.read_text())
    return frozenset(github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M))


# ---- what the docs quote ---------------------------------------------------------------------------
def quoted_env_names(text: str) -> set[str]:
    names = set()
    for line in code_lines(text):
        names |= set(ENV_NAME.findall(line))
    return names


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(script, the words after it) for each known script or module a code line runs."""
    found = []
    for part in re.split(r"&&|\|\||;|\|", strip_comment(line)):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        for i, word in enumerate(words):
            name = re.sub(r"^(?:\./|/app/)", "", word)
            if word == "-m" and i + 1 < len(words):
                name = words[i + 1]
            if name in SCRIPTS:
                found.append((name, []))
            elif found and word not in ("python", "python3", "bash") and words[i - 1 : i] != ["-m"]:
                found[-1][1].append(word)  # the words up to the next script are this one's
    return found


def flags_of(words: list[str]) -> list[str]:
    flags = []
    for word in words:
        word = word.strip("[]").rstrip(".")
        if word == "--":  # the rest goes to another program (build.sh: the engine)
            break
        if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", word):
            flags.append(word.split("=", 1)[0])
    return flags


def quoted_paths(text: str) -> set[str]:
    paths = set()
    for span in SPAN.findall(text) + [w for b in FENCE.findall(text) for w in strip_comment(b).split()]:
        span = span.strip().rstrip(",.:;)")
        if not span or re.search(r"[\s<>*…${}]|\.\.\.|://|^-", span):
            continue
        if span.startswith("/app/"):
            paths.add(span[len("/app/") :])
        elif span.removeprefix("./").split("/", 1)[0] in top_level_entries() and "/" in span.removeprefix("./"):
            paths.add(span.removeprefix("./"))
        elif span in top_level_entries():
            paths.add(span)
    return paths


# ---- the tests -------------------------------------------------------------------------------------
DOCS = doc_files()
IDS = [p.relative_to(ROOT).as_posix() for p in DOCS]


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_quoted_env_var_exists(doc):
    unknown = sorted(n for n in quoted_env_names(doc.read_text()) if not is_known_env(n))
    assert unknown == [], f"{doc.name} quotes environment variables nothing reads"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_quoted_flag_exists(doc):
    missing = []
    for line in code_lines(doc.read_text()):
        for script, words in invocations(line):
            if SCRIPTS[script] is None:
                continue
            text = help_text(script)
            missing += [
                f"{script} {flag}" for flag in flags_of(words) if not re.search(rf"(?<![\w-]){flag}(?![\w-])", text)
            ]
    assert missing == [], f"{doc.name} quotes flags the scripts do not take"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_quoted_command_and_path_exists(doc):
    text = doc.read_text()
    missing = [p for p in sorted(quoted_paths(text)) if not (ROOT / p.rstrip("/")).exists()]
    for line in code_lines(text):
        for script, _ in invocations(line):
            if "." in script and not script.endswith((".sh", ".py")):  # a module: comfy_worker.api
                if importlib.util.find_spec(script) is None:
                    missing.append(f"python -m {script}")
            elif not (ROOT / script).is_file():
                missing.append(script)
    assert missing == [], f"{doc.name} quotes files or commands that do not exist"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_relative_link_and_anchor_exists(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists() or anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert broken == [], f"{doc.name} links to files or headings that do not exist"


def test_readme_starts_with_the_two_commands():
    first_block = FENCE.search((ROOT / "README.md").read_text()).group(1)
    commands = [strip_comment(line).strip() for line in first_block.splitlines()]
    assert commands == ["./scripts/dev.sh", "./scripts/test.sh"]


# ---- example requests ------------------------------------------------------------------------------
OWN_DOCS = [
    "README.md",
    "docs/runpod-guide.md",
    "docs/configuration-guide.md",
    "docs/troubleshooting.md",
    "docs/quickstart_id.md",
]


def example_requests() -> list[tuple[str, dict]]:
    found = [(p.relative_to(ROOT).as_posix(), json.loads(p.read_text())) for p in sorted(ROOT.glob("examples/*.json"))]
    found.append(("test_input.json", json.loads((ROOT / "test_input.json").read_text())))
    for name in OWN_DOCS:
        path = ROOT / name
        for i, block in enumerate(
            re.findall(r"^```json\n(.*?)^```", path.read_text() if path.exists() else "", re.M | re.S)
        ):
            body = json.loads(block)
            if isinstance(body, dict) and "input" in body:
                found.append((f"{name} json block {i}", body))
    return found


@pytest.mark.parametrize("name,body", example_requests(), ids=[n for n, _ in example_requests()])
def test_example_request_passes_the_handlers_input_rules(name, body):
    assert set(body) <= {"input", "webhook", "policy", "s3Config"}, "a RunPod request body"
    job = parse_job_input(body["input"])
    apply_overrides(copy.deepcopy(job.workflow), job.overrides)  # every override names a node and a field that exist
    for image in job.images:
        assert any(image.name == v for node in job.workflow.values() for v in node.get("inputs", {}).values()), (
            f"{name}: image {image.name!r} is used by no workflow input"
        )


def test_the_examples_are_real_requests():
    names = [n for n, _ in example_requests()]
    for wanted in ("examples/quickstart.json", "examples/image_overrides.json", "examples/workflow_upscale.json"):
        assert wanted in names


def test_s3_example_names_only_settings_the_worker_reads():
    text = (ROOT / "examples" / "s3.env").read_text()
    names = re.findall(r"^([A-Z][A-Z0-9_]+)=", text, re.M)
    assert names and all(n in known_env_names() and n not in EXTERNAL for n in names)


# ---- configuration-guide.md against the schema; env.md the one table of variables ------------------
CONFIGURATION = ROOT / "docs" / "configuration-guide.md"


def test_configuration_md_covers_every_config_field():
    fields = re.findall(r"^\| `([^`]+)` \|", config_schema.docs_table(), re.M)
    spans = set(SPAN.findall(CONFIGURATION.read_text()))
    assert fields and [f for f in fields if f not in spans] == []
    mentioned = {s for s in spans if re.fullmatch(r"(comfyui|models\[\]|nodes\[\])\.\w+", s)}
    assert mentioned - set(fields) == set(), "configuration-guide.md names config fields the schema does not have"


def env_rows(text: str) -> dict[str, str]:
    """variable -> its default cell, from every table row that starts with a variable."""
    rows = {}
    for first, default in re.findall(r"^\| (`[A-Z][^|]*?) \| ([^|]*?) \|", text, re.M):
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", first):
            rows[name] = default.strip()
    return rows


def test_each_env_var_is_tabled_once_in_env_md():
    """issue 21 #12: the variables were tabled in three files (env.md, configuration.md, api.md) that
    drifted apart; now env.md alone has a row per variable and the other pages link to it. (The image's
    build arguments, some of the same names, are another thing: image-reference.md's own table.)"""
    source = (ROOT / "comfy_worker" / "settings.py").read_text()
    read = set(re.findall(r'env(?:\.get\(|\[)"([A-Z][A-Z0-9_]+)"', source))
    read |= set(re.findall(r'_(?:int|float|flag|choice)\(env, "([A-Z][A-Z0-9_]+)"', source))
    read |= set(SECRET_ENV_NAMES)
    assert sorted(read - set(env_rows((ROOT / "docs" / "env.md").read_text()))) == []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.name in ("env.md", "image-reference.md"):
            continue
        tabled = set(env_rows(doc.read_text())) & read
        assert tabled == set(), f"{doc.name} tables {sorted(tabled)}: link to env.md instead"


def test_doc_names_say_guide_or_reference():
    """issue 21 #12: config.md/configuration.md and deploy.md/deployment.md were twins whose names did not
    say how they differ."""
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert not names & {"config.md", "configuration.md", "deploy.md", "deployment.md"}
    for name in ("config-reference.md", "configuration-guide.md", "image-reference.md", "runpod-guide.md"):
        title = (ROOT / "docs" / name).read_text().splitlines()[0].lower()
        assert ("guide" if "guide" in name else "reference") in title, (name, title)


def transcripts() -> list[tuple[str, str, str]]:
    """Every ``$ .venv/bin/python check_workflow.py …`` transcript in the docs whose arguments are files of the repo:
    (doc, command line, the output printed under it)."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        transcript = r"```\n(\$ \.venv/bin/python check_workflow\.py [^\n]*)\n(.*?)```"
        for block in re.findall(transcript, doc.read_text(), re.DOTALL):
            command, output = block
            args = shlex.split(command[2:])[2:]
            if all((ROOT / a).exists() for a in args if not a.startswith("-")) and output.strip():
                found.append((doc.name, command, output))
    return found


@pytest.mark.parametrize(("doc", "command", "output"), transcripts())
def test_a_documented_check_workflow_transcript_is_what_the_command_prints(doc, command, output, tmp_path):
    """issue 21: docs/check_workflow.md showed `wrong_folder` where the command prints `missing`.
    Node packs and model URLs are looked up on loopback (issue 22: the suite stays offline)."""
    server = NodeDataServer()
    env = {**os.environ, **server.env(), "XDG_CACHE_HOME": str(tmp_path)}
    try:
        args = [PY, *shlex.split(command[2:])[1:]]
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    finally:
        server.close()
    assert (done.stdout + done.stderr).splitlines() == output.splitlines(), f"{doc}: {command}"


def test_the_transcripts_are_found():
    assert any(doc == "check_workflow.md" for doc, _, _ in transcripts())
