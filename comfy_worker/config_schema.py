"""The config.yml schema: the single source of truth for validation, config.schema.json and the
docs table of fields, plus the loaders (file, string, CONFIG_YML) and the canonical digest.

Regenerate the derived files with ``python -m comfy_worker.config_schema --write``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import difflib
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from comfy_worker.file_names import url_filename
from comfy_worker.log_setup import safe_url
from comfy_worker.settings import DEFAULT_COMFYUI_REF

# Bump when the provisioning layout changes in a way that must re-provision existing volumes.
PROVISION_FORMAT_VERSION = 1

ROOT = Path(__file__).resolve().parents[1]  # the repo (or /app in the image)
SCHEMA_PATH = ROOT / "config.schema.json"
DOCS_PATH = ROOT / "docs" / "config-reference.md"
DOCS_BEGIN = "<!-- BEGIN GENERATED FIELDS (python -m comfy_worker.config_schema --write) -->"
DOCS_END = "<!-- END GENERATED FIELDS -->"

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")

# Messages stay short whatever the input: a value is shown up to _MAX_SHOWN characters, a problem
# line up to _MAX_PROBLEM, and at most _MAX_PROBLEMS lines are listed.
_MAX_SHOWN = 120
_MAX_PROBLEM = 500
_MAX_PROBLEMS = 50

# Query parameters that carry a credential (compared lower-case, without '-' and '_'); any name
# ending in "token" counts too. Signed links (sig, X-Amz-Signature...) expire and are credentials.
_SECRET_PARAMS = {
    "apikey",
    "auth",
    "authorization",
    "password",
    "passwd",
    "secret",
    "clientsecret",
    "sig",
    "signature",
    "xamzsignature",
    "xamzcredential",
    "xgoogsignature",
    "xgoogcredential",
}
_SIGNATURE_PARAMS = {"sig", "signature", "xamzsignature", "xamzcredential", "xgoogsignature", "xgoogcredential"}


class ConfigError(Exception):
    """An invalid config: ``problems`` holds one readable line per problem."""

    def __init__(self, problems: list[str], source: str = "config", total: int | None = None):
        self.problems = problems
        self.source = source
        self.total = len(problems) if total is None else total  # all found, also those not listed
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


class _NotBase64Config(ConfigError):
    """CONFIG_YML read as base64 is not a config's text; ``binary``: it decodes to bytes that are not text."""

    def __init__(self, problem: str, binary: bool = False):
        super().__init__([problem], "CONFIG_YML")
        self.binary = binary


def _clip(text: str, limit: int = _MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value: Any) -> str:
    """A value for a message: a string quoted and clipped, anything else by its type only (a YAML
    alias can make a structure of millions of items out of a few hundred bytes)."""
    if isinstance(value, str):
        return repr(_clip(value))
    return f"a {type(value).__name__}"


def _display_url(url: Any) -> str:
    """A URL for messages: user info (user:password@) masked, the query string and fragment shown as
    ``?…`` (they carry tokens and signatures), clipped; ``""`` for a value that is not a string."""
    if not isinstance(url, str):
        return ""
    text = safe_url(re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]+@", r"\1***@", url))
    return _clip(re.sub(r"[?#].*", "?…", text, flags=re.DOTALL))


def _no_leading_dash(value: str) -> str:
    if value.startswith("-"):
        raise ValueError(f"must not begin with '-' ({_shown(value)} would be read as a command-line option)")
    return value


def _not_a_yaml_scalar(value: Any, field: str) -> Any:
    """Text fields written unquoted that YAML reads as a number or a boolean get a message saying to
    quote them (``sha256: 0123…`` is an octal number to YAML, ``version: 1.10`` the float 1.1)."""
    if isinstance(value, bool):
        raise ValueError(
            f"YAML reads this unquoted value as the boolean {str(value).lower()}, not as text; "
            f'put it in quotes, e.g. {field}: "yes"'
        )
    if isinstance(value, int | float):
        example = '"<64 hexadecimal digits>"' if field == "sha256" else '"1.10"'
        raise ValueError(
            f"YAML reads this unquoted value as a number, not as text (digits may already be lost, "
            f"e.g. a leading 0); put it in quotes, e.g. {field}: {example}"
        )
    return value


def _no_query_credentials(value: str, section: str) -> str:
    """Reject a token or signature in the query string: it would reach logs, summaries and
    comfy.lock.yml on the shared volume. The parameter is named, its value never shown."""
    for name, _ in parse_qsl(urlparse(value).query, keep_blank_values=True):
        key = re.sub(r"[-_]", "", name.lower())
        if not (key.endswith("token") or key in _SECRET_PARAMS):
            continue
        shown = f"{_clip(name, 40)}=***"
        if key in _SIGNATURE_PARAMS:
            raise ValueError(
                f"is a signed link ({shown} in its query string): it expires and is a credential that would "
                "end up in logs and comfy.lock.yml; use a permanent URL"
            )
        host = (urlparse(value).hostname or "").lower()
        if "civitai" in host:
            fix = "set CIVITAI_TOKEN instead (it is sent to CivitAI only)"
        elif host.endswith(("huggingface.co", "hf.co")):
            fix = "set HF_TOKEN instead (it is sent to Hugging Face only)"
        elif section == "nodes":
            fix = "set GITHUB_TOKEN for GitHub, or use an ssh URL with a key"
        else:
            fix = "tokens are supported as CIVITAI_TOKEN (CivitAI) and HF_TOKEN (Hugging Face)"
        raise ValueError(
            f"must not carry a token in its query string ({shown}): it would end up in logs and "
            f"comfy.lock.yml; remove it from the URL and {fix}"
        )
    return value


def _no_credentials(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https") and (parsed.username or parsed.password):
        raise ValueError(
            "must not contain credentials (user:password@ or a token before '@'): they would end up in "
            "logs and .git/config; set HF_TOKEN, CIVITAI_TOKEN or GITHUB_TOKEN instead"
        )
    if parsed.scheme == "ssh" and parsed.password:
        raise ValueError("must not contain a password; use an ssh key")
    return value


def _relative_path(value: str, nested: bool) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"must be a relative path, not an absolute one ({_shown(value)})")
    parts = [p for p in re.split(r"[/\\]", value) if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"must not contain '..' ({_shown(value)}); everything stays inside ComfyUI's folders")
    if not parts:
        raise ValueError(f"must name a folder or file, not {_shown(value)}")
    if not nested and len(parts) > 1:
        raise ValueError(f"must be a plain name without '/' ({_shown(value)})")
    _no_leading_dash(parts[0])
    return "/".join(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ComfyUISection(_Strict):
    """ComfyUI itself."""

    ref: str | None = Field(
        default=None,
        description=f"Tag, branch or commit of `COMFYUI_REPO` to install, or `latest`: the newest release tag "
        f"(`vX.Y.Z`), resolved once and kept in comfy.lock.yml until `apply_config.sh --update` "
        f"(env `COMFYUI_REF` wins; default `{DEFAULT_COMFYUI_REF}`).",
    )

    @field_validator("ref", mode="before")
    @classmethod
    def _text(cls, v: Any, info: ValidationInfo) -> Any:
        return _not_a_yaml_scalar(v, info.field_name)

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        if v is not None:
            if not v:
                raise ValueError("must not be empty")
            _no_leading_dash(v)
        return v


class ModelEntry(_Strict):
    """One model file to download."""

    url: str = Field(description="Where to download from: a Hugging Face, CivitAI or any HTTP(S) URL.")
    destination: str = Field(
        description="Folder under `ComfyUI/models` (nested allowed, e.g. `loras/wan`).",
    )
    filename: str | None = Field(
        default=None,
        description="File name to save as; default: the server's Content-Disposition, else the last URL path segment.",
    )
    sha256: str | None = Field(default=None, description="Expected SHA256 (64 hex digits); a mismatch fails the entry.")
    size: int | None = Field(
        default=None,
        ge=0,
        description="Expected size in bytes (comfy.lock.yml writes it); a mismatch fails the entry.",
    )
    optional: bool = Field(default=False, description="A failed optional entry never fails provisioning.")

    @field_validator("url", "destination", "filename", "sha256", mode="before")
    @classmethod
    def _text(cls, v: Any, info: ValidationInfo) -> Any:
        return _not_a_yaml_scalar(v, info.field_name)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        _no_leading_dash(v)
        parsed = urlparse(v)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"must be an http(s) URL, not {_shown(_display_url(v))}")
        _no_credentials(v)
        return _no_query_credentials(v, "models")

    @field_validator("destination")
    @classmethod
    def _destination(cls, v: str) -> str:
        return _relative_path(v, nested=True)

    @field_validator("filename")
    @classmethod
    def _filename(cls, v: str | None) -> str | None:
        return None if v is None else _relative_path(v, nested=False)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not _SHA256_RE.match(v):
            raise ValueError(
                f"must be 64 hexadecimal digits (got {len(v)} characters: {_shown(v)}); `sha256sum FILE` prints it"
            )
        return v.lower()

    def url_filename(self) -> str:
        """The last path segment of the URL (the fallback file name)."""
        return url_filename(self.url) or "download"

    def planned_path(self) -> str:
        """destination/filename as far as it is known before contacting the server."""
        return f"{self.destination}/{self.filename or self.url_filename()}"


class NodeEntry(_Strict):
    """One custom node (a git repository) to install into `ComfyUI/custom_nodes`."""

    url: str = Field(description="Git URL: https, ssh (`git@host:org/repo.git`), `file://` or a local path.")
    version: str = Field(
        default="latest",
        description="`latest` (newest release tag, else default branch), `nightly` (default branch "
        "head), a tag, a branch, or a commit sha.",
    )
    name: str | None = Field(
        default=None, description="Directory name under `custom_nodes` (default: the repo name from the URL)."
    )
    optional: bool = Field(default=False, description="A failed optional entry never fails provisioning.")
    requirements: bool = Field(
        default=True, description="Install the node's `requirements.txt` and run its `install.py`."
    )

    @field_validator("url", "version", "name", mode="before")
    @classmethod
    def _text(cls, v: Any, info: ValidationInfo) -> Any:
        return _not_a_yaml_scalar(v, info.field_name)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return _no_query_credentials(_no_credentials(_no_leading_dash(v)), "nodes")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty (use 'latest', 'nightly', a tag, a branch or a sha)")
        return _no_leading_dash(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _relative_path(v, nested=False)

    @model_validator(mode="after")
    def _usable_folder_from_url(self) -> NodeEntry:
        """Without ``name`` the folder comes from the URL, and gets the checks an explicit name gets
        (a URL ending in ``/.``, ``/..``, ``/.git`` or ``/-x`` names no usable folder)."""
        if self.name is None:
            derived = self.dir_name()
            try:
                checked = _relative_path(derived, nested=False)
                reason = None if checked == derived else f"it would be read as {checked!r}"
            except ValueError as err:
                reason = str(err)
            if reason:
                raise ValueError(
                    f"name: the folder name {_clip(derived, 60)!r} taken from the URL is not usable ({reason}); "
                    "set 'name' to the folder to use under custom_nodes"
                )
        return self

    def dir_name(self) -> str:
        """The folder under custom_nodes: ``name`` or the repository name from the URL."""
        if self.name:
            return self.name
        tail = re.split(r"[/:\\]", self.url.rstrip("/\\"))[-1]
        return tail[:-4] if tail.endswith(".git") else tail


class WorkerConfig(_Strict):
    """The whole config.yml."""

    comfyui: ComfyUISection = Field(default_factory=ComfyUISection, description="ComfyUI itself (optional).")
    models: list[ModelEntry] = Field(default_factory=list, description="Model files to download.")
    nodes: list[NodeEntry] = Field(default_factory=list, description="Custom nodes to git-install.")

    @field_validator("models", "nodes", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return [] if v is None else v

    @field_validator("comfyui", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _no_duplicate_targets(self) -> WorkerConfig:
        problems = _duplicate_problems(list(enumerate(self.models)), list(enumerate(self.nodes)))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def comfyui_ref(self) -> str:
        return self.comfyui.ref or DEFAULT_COMFYUI_REF


_SECTIONS: dict[str, type[BaseModel]] = {"models": ModelEntry, "nodes": NodeEntry}


def _duplicate_problems(models: list[tuple[int, ModelEntry]], nodes: list[tuple[int, NodeEntry]]) -> list[str]:
    problems = []
    seen: dict[str, int] = {}
    for i, m in models:
        key = m.planned_path().lower()
        if key in seen:
            problems.append(
                f"models[{i}] ({_display_url(m.url)}): destination/filename: target models/{m.planned_path()} is already "
                f"used by models[{seen[key]}]; give one of them another filename or destination"
            )
        seen.setdefault(key, i)
    seen = {}
    for i, n in nodes:
        key = n.dir_name().lower()
        if key in seen:
            problems.append(
                f"nodes[{i}] ({_display_url(n.url)}): name: directory custom_nodes/{n.dir_name()} is already used by "
                f"nodes[{seen[key]}]; set a different 'name'"
            )
        seen.setdefault(key, i)
    return problems


# the fields that decide where an entry lands (its file under models/, its folder under custom_nodes/)
_PLACE_FIELDS = {"models": ("url", "destination", "filename"), "nodes": ("url", "name")}


def _individually_valid(raw: dict, section: str) -> list[tuple[int, Any]]:
    items = raw.get(section)
    if not isinstance(items, list):
        return []
    valid = []
    for i, item in enumerate(items):
        try:
            valid.append((i, _SECTIONS[section].model_validate(item)))
        except ValidationError:  # judged by the fields that decide where it goes, so a clash shows at once
            if isinstance(item, dict):
                with contextlib.suppress(ValidationError):
                    where = {k: item[k] for k in _PLACE_FIELDS[section] if k in item}
                    valid.append((i, _SECTIONS[section].model_validate(where)))
    return valid


def _entry_label(raw: Any, loc: tuple) -> str:
    """'models[2] (https://...)' for an error location, or the dotted path for top-level fields."""
    if len(loc) >= 2 and loc[0] in _SECTIONS and isinstance(loc[1], int):
        label = f"{loc[0]}[{loc[1]}]"
        try:
            url = _display_url(raw[loc[0]][loc[1]].get("url"))
        except (AttributeError, IndexError, KeyError, TypeError):
            url = ""
        return f"{label} ({url})" if url else label
    return _clip(str(loc[0]), 60) if loc else "config"


def _did_you_mean(key: str, loc: tuple) -> str:
    if len(loc) >= 2 and loc[0] in _SECTIONS:
        choices = list(_SECTIONS[loc[0]].model_fields)
    elif len(loc) >= 2 and loc[0] == "comfyui":
        choices = list(ComfyUISection.model_fields)
    else:
        choices = list(WorkerConfig.model_fields)
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; allowed keys: {', '.join(choices)}"


def _problems_from(err: ValidationError, raw: Any) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "extra_forbidden":
            field_loc = loc[:-1]
            problems.append(
                f"{_entry_label(raw, field_loc)}: unknown key '{_clip(str(loc[-1]), 60)}'"
                f"{_did_you_mean(str(loc[-1])[:200], loc)}"
            )
        elif e["type"] == "missing":
            problems.append(f"{_entry_label(raw, loc[:-1])}: field '{loc[-1]}' is required")
        elif not loc:  # model-level validator (duplicates): already fully worded, one per line
            problems.extend(msg.split("\n"))
        elif loc[0] in _SECTIONS and len(loc) == 2:  # an entry's own validator: the message names the field
            problems.append(f"{_entry_label(raw, loc)}: {msg}")
        else:
            in_entry = loc[0] in _SECTIONS and len(loc) > 2
            field = _clip(".".join(map(str, loc[2:] if in_entry else loc[1:] or loc)), 80)
            problems.append(f"{_entry_label(raw, loc)}: {field}: {msg}")
    if not any(not e["loc"] for e in err.errors()):  # duplicates are only checked once all else is valid
        problems.extend(_duplicate_problems(_individually_valid(raw, "models"), _individually_valid(raw, "nodes")))
    return problems


def _bounded(problems: list[str]) -> list[str]:
    """At most _MAX_PROBLEMS lines of at most _MAX_PROBLEM characters each."""
    shown = [_clip(p, _MAX_PROBLEM) for p in problems[:_MAX_PROBLEMS]]
    if len(problems) > _MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more problem(s); fix these first")
    return shown


def parse_config(raw: Any, source: str = "config") -> WorkerConfig:
    """Validate already-parsed YAML data; raises ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"the top level must be a mapping with models/nodes/comfyui, not {type(raw).__name__}"], source
        )
    try:
        return WorkerConfig.model_validate(raw)
    except ValidationError as err:
        problems = _problems_from(err, raw)
        raise ConfigError(_bounded(problems), source, total=len(problems)) from None


class _YamlFailure(Exception):
    """The text is not YAML; ``problem`` says where and why, in one line."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


class _DuplicateKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that notes every mapping key written twice, at any depth (YAML itself keeps
    the last one silently, so a second ``nodes:`` block would drop the first)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = first_line.get(key)
                if first is None:
                    first_line[key] = line
                    continue
            except TypeError:  # unhashable: SafeLoader reports it itself
                continue
            self.duplicates.append(
                (
                    line,
                    f"duplicate key {_shown(key)} at line {line} (first at line {first}): YAML would keep only "
                    "the last one; merge the two into one",
                )
            )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: BaseException) -> str:
    """One line saying where and why the text is not YAML."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        problem = err.problem or str(err)
        hint = "; indent with spaces, YAML does not allow tabs there" if "'\\t'" in problem else ""
        return f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {_clip(problem)}{hint}"
    if isinstance(err, yaml.reader.ReaderError):
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        return f"not valid YAML at character {err.position + 1}: the character {char} is not allowed ({err.reason})"
    if isinstance(err, RecursionError):
        return "not valid YAML for a config: it is nested too deeply"
    return f"not valid YAML: {_clip(str(err))}"


def _read_yaml(text: str) -> tuple[Any, list[str]]:
    """The data of ``text`` and its duplicate-key problems in line order; raises _YamlFailure when it
    is not YAML."""
    loader = None
    try:
        loader = _DuplicateKeyLoader(text)  # checks the characters at once
        return loader.get_single_data(), [problem for _, problem in sorted(loader.duplicates)]
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: an int of > 4300 digits
        raise _YamlFailure(_yaml_problem(err)) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_load(text: str, source: str) -> Any:
    try:
        data, duplicates = _read_yaml(text)
    except _YamlFailure as failure:
        raise ConfigError([failure.problem], source) from None
    if duplicates:
        raise ConfigError(_bounded(duplicates), source, total=len(duplicates))
    return data


def load_config_text(text: str, source: str = "config") -> WorkerConfig:
    return parse_config(_yaml_load(text, source), source)


def _utf8(data: bytes, what: str, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            [
                f"{what} is not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} (line {line}) "
                "cannot be decoded; save it as UTF-8"
            ],
            source,
        ) from None


def load_config(path: str | Path) -> WorkerConfig:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError([f"cannot read {path}: {err.strerror}"], str(path)) from None
    return load_config_text(_utf8(data, str(path), str(path)), str(path))


_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
_HOW_TO_ENCODE = "encode the file with `base64 -w0 config.yml`"


def decode_config_env(value: str) -> str:
    """The YAML text carried by a CONFIG_YML value: plain YAML first, then base64 (standard or
    URL-safe alphabet, padding optional, whitespace ignored). Raises ConfigError saying which reading
    failed and where: a YAML syntax error keeps its line and column, compressed data is named, and
    YAML that is no mapping (a list, a number) is named as what it is."""
    source = "CONFIG_YML"
    if not value.strip():
        raise ConfigError(
            [
                "the value is empty; set it to a config.yml or its base64 (`base64 -w0 config.yml`), "
                "or unset CONFIG_YML to use $VOLUME_ROOT/config.yml"
            ],
            source,
        )
    try:
        plain, _ = _read_yaml(value)  # duplicate keys are reported by load_config_text
        yaml_problem = None
    except _YamlFailure as failure:
        plain, yaml_problem = None, failure.problem
    if isinstance(plain, dict):
        return value
    try:
        return _decode_base64_config(value, yaml_problem)
    except _NotBase64Config as err:
        if yaml_problem is not None:  # not YAML either: base64's reason (and YAML's) are already given
            raise
        if isinstance(plain, str):  # one word or line: not shown (it may be a pasted secret)
            if not err.binary:
                raise
            raise ConfigError(
                [
                    err.problems[0].replace(
                        "neither a YAML mapping (models:/nodes:)",
                        f"neither a YAML mapping (models:/nodes:; read as YAML it is one string of {len(plain)} "
                        "characters)",
                        1,
                    )
                ],
                source,
            ) from None
        raise ConfigError(
            [
                f"the value is {_yaml_kind(plain)}, but a config is a YAML mapping: `models:` and `nodes:` at the "
                "top level, their entries indented under them (`models:` on its own line, then `  - url: ...`); "
                f"fix the YAML, or {_HOW_TO_ENCODE}"
            ],
            source,
        ) from None


def _yaml_kind(value: object) -> str:
    """What a parsed YAML value is, for a message: ``a YAML list of 2 item(s)``."""
    if isinstance(value, list):
        return f"a YAML list of {len(value)} item(s)"
    if value is None:
        return "YAML null (no value)"
    if isinstance(value, bool):
        return f"a YAML boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a YAML number ({value})"
    return f"a YAML {type(value).__name__}"


def _decode_base64_config(value: str, yaml_problem: str | None) -> str:
    """The YAML text of a base64 CONFIG_YML value; _NotBase64Config saying why it is none (ConfigError
    for a decoded text that is broken YAML)."""
    compact = re.sub(r"\s+", "", value)
    data = None
    not_base64 = "it has characters outside the base64 alphabet"
    if _BASE64_RE.fullmatch(compact):
        not_base64 = "its length is not that of base64 (text cut short?)"
        with contextlib.suppress(binascii.Error, ValueError):
            padded = compact.replace("-", "+").replace("_", "/") + "=" * (-len(compact) % 4)
            data = base64.b64decode(padded, validate=True)
    if data is None:
        if yaml_problem:
            raise _NotBase64Config(
                f"the value is neither a YAML mapping (models:/nodes:) nor base64 of one. Read as YAML, it is "
                f"{yaml_problem}; fix the YAML there. Read as base64, {not_base64}; to pass base64 "
                f"instead, {_HOW_TO_ENCODE}"
            )
        raise _NotBase64Config(
            f"the value is neither a YAML mapping (models:/nodes:) nor valid base64 of one; {_HOW_TO_ENCODE}"
        )
    compressed = next((name for magic, name in _COMPRESSED.items() if data.startswith(magic)), None)
    if compressed:
        raise _NotBase64Config(
            f"the value is neither a YAML mapping (models:/nodes:) nor base64 of one: it is base64 of "
            f"{compressed}-compressed data, which CONFIG_YML does not take; {_HOW_TO_ENCODE} (without {compressed})"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _NotBase64Config(
            f"the value is neither a YAML mapping (models:/nodes:) nor base64 of one: it decodes from base64 "
            f"to binary data (byte 0x{data[err.start]:02x} at byte offset {err.start} is not UTF-8); "
            f"{_HOW_TO_ENCODE}",
            binary=True,
        ) from None
    decoded = _yaml_load(text, "CONFIG_YML (decoded from base64)")
    if not isinstance(decoded, dict):
        raise _NotBase64Config(
            f"the value decodes from base64 but the result is not a config (a YAML mapping with "
            f"models:/nodes:), it is a {type(decoded).__name__}; encode the config.yml file itself"
        )
    return text


def load_config_env(value: str) -> WorkerConfig:
    return load_config_text(decode_config_env(value), "CONFIG_YML")


def canonical_json(cfg: WorkerConfig) -> str:
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_digest(cfg: WorkerConfig, comfyui_ref: str | None = None) -> str:
    """SHA256 of the parsed config (defaults filled in), the effective ComfyUI ref and the
    provisioning format version: comments, whitespace and key order do not change it."""
    config = json.loads(canonical_json(cfg))
    del config["comfyui"]  # represented by the effective ref below, so `ref: <default>` == no ref
    payload = {
        "config": config,
        "comfyui_ref": comfyui_ref or cfg.comfyui_ref(),
        "format": PROVISION_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- derived artefacts: JSON Schema and the docs table ----


def json_schema() -> dict:
    schema = WorkerConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "comfy-worker config.yml"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def docs_table() -> str:
    rows = ["| key | type | required | default | meaning |", "|---|---|---|---|---|"]
    for prefix, model in (("comfyui.", ComfyUISection), ("models[].", ModelEntry), ("nodes[].", NodeEntry)):
        for name, f in model.model_fields.items():
            ann = f.annotation
            typ = getattr(ann, "__name__", None) or str(ann).replace("typing.", "").replace(" | None", "")
            typ = typ.replace("NoneType", "").strip("| ")
            required = "yes" if f.is_required() else "no"
            default = "" if f.is_required() or f.default is None else f"`{json.dumps(f.default)}`"
            rows.append(f"| `{prefix}{name}` | {typ} | {required} | {default} | {f.description or ''} |")
    return "\n".join(rows) + "\n"


def docs_with_table(doc_text: str) -> str:
    head, _, rest = doc_text.partition(DOCS_BEGIN)
    _, _, tail = rest.partition(DOCS_END)
    return f"{head}{DOCS_BEGIN}\n{docs_table()}{DOCS_END}{tail}"


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print(
            "usage: python -m comfy_worker.config_schema --write   (regenerates config.schema.json and docs/config-reference.md)"
        )
        return 2
    SCHEMA_PATH.write_text(json_schema_text(), encoding="utf-8")
    DOCS_PATH.write_text(docs_with_table(DOCS_PATH.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH.name} and {DOCS_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
