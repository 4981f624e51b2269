"""Check workflows against config.yml: does the config provide every model file (in the folder its
loader reads) and every custom node they need? ``--suggest`` prints the config.yml entries to add.

    python check_workflow.py WORKFLOW... [--config PATH] [--comfy-host H] [--suggest] [--json]

A WORKFLOW is an API-format workflow, a UI-format workflow (Workflow > Save), a job JSON
(``{"input": {"workflow": ...}}``), a ``/prompt`` body, or a PNG/WebP image ComfyUI saved (its
embedded ``prompt``/``workflow`` metadata). Exit 0 when the config provides everything, 1 when
something is missing, 2 for unreadable input (or an invalid config, an unreachable ``--comfy-host``).
The guide: docs/check_workflow.md. The logic lives here so that deploy.sh --from-workflow can use it
too; check_workflow.py at the top level is the command.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from pydantic import ValidationError

from comfy_worker import model_folders, node_packs
from comfy_worker.cli import load_selected_config
from comfy_worker.config_schema import ConfigError, ModelEntry, NodeEntry, WorkerConfig
from comfy_worker.core_nodes import CORE_COMFYUI_VERSION, CORE_NODE_CLASSES, FRONTEND_ONLY
from comfy_worker.file_names import url_filename
from comfy_worker.node_packs import COMPONENT_RE, FRONTEND_ONLY_PACKS, IMPACT_PACK, NodePacks, repo_key
from comfy_worker.settings import Settings

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_UNREADABLE = 2

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INACTIVE_MODES = {2: "muted", 4: "bypassed"}  # LiteGraph node modes that never reach /prompt
MAX_SUBGRAPH_DEPTH = 32
_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,40}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class Unreadable(Exception):
    """A workflow file that cannot be read as a workflow; the message says why."""


# --- reading --------------------------------------------------------------------------------------
@dataclass
class Workflow:
    path: str
    kind: str  # what the file is, for the report
    api: dict | None = None  # API format: node id -> {"class_type", "inputs"}
    ui: dict | None = None  # UI format: {"nodes", "links", "definitions"...}


def _is_api(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(n, dict) and isinstance(n.get("class_type"), str) for n in obj.values())
    )


def _is_ui(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("nodes"), list)


def _parse_json_text(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        where = f" at line {err.lineno} column {err.colno}" if hasattr(err, "lineno") else ""
        raise Unreadable(f"{what} is not JSON ({getattr(err, 'msg', err)}{where})") from None


def _workflow_object(obj: Any, path: str, kind: str, ui: dict | None = None) -> Workflow:
    """A Workflow from one decoded object that should be an API- or UI-format workflow."""
    if isinstance(obj, str):  # a job may carry the workflow as a JSON string
        obj = _parse_json_text(obj, "the workflow string")
    if _is_ui(obj):
        return Workflow(path, f"{kind}UI format", ui=obj)
    if _is_api(obj):
        return Workflow(path, f"{kind}API format", api=obj, ui=ui if _is_ui(ui) else None)
    if isinstance(obj, dict) and obj:
        bad = next(
            (k for k, n in obj.items() if not (isinstance(n, dict) and isinstance(n.get("class_type"), str))), None
        )
        raise Unreadable(
            f"not a ComfyUI workflow: neither UI format (no 'nodes' list) nor API format "
            f"(entry {str(bad)[:40]!r} has no 'class_type')"
        )
    what = "an empty object" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
    raise Unreadable(f"not a ComfyUI workflow: the JSON is {what}")


def workflow_from_json(obj: Any, path: str) -> Workflow:
    """Recognise a job JSON, a /prompt body or a workflow in either format."""
    if isinstance(obj, dict) and isinstance(obj.get("input"), dict):
        if "workflow" not in obj["input"]:
            raise Unreadable("a job JSON without input.workflow")
        return _workflow_object(obj["input"]["workflow"], path, "job JSON, ")
    if isinstance(obj, dict) and _is_api(obj.get("prompt")):
        extra = obj.get("extra_data") if isinstance(obj.get("extra_data"), dict) else {}
        pnginfo = extra.get("extra_pnginfo") if isinstance(extra.get("extra_pnginfo"), dict) else {}
        return _workflow_object(obj["prompt"], path, "/prompt body, ", ui=pnginfo.get("workflow"))
    return _workflow_object(obj, path, "")


def _image_metadata(data: bytes) -> tuple[str, dict[str, str]]:
    """The image format and its ComfyUI text metadata (``prompt``, ``workflow``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise Unreadable(f"a damaged image ({err})") from None
    found: dict[str, str] = {}
    if image.format == "PNG":  # tEXt/iTXt chunks
        for key in ("prompt", "workflow"):
            if isinstance(image.info.get(key), str):
                found[key] = image.info[key]
    else:  # WebP: EXIF Model (0x0110) = "prompt:<json>", Make (0x010f) and below = "<key>:<json>"
        try:
            exif = image.getexif()
        except (OSError, ValueError, SyntaxError):
            exif = {}
        for value in exif.values():
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if isinstance(value, str):
                key, sep, rest = value.partition(":")
                if sep and key in ("prompt", "workflow"):
                    found[key] = rest
    return image.format or "image", found


def read_workflow(path: str) -> Workflow:
    """The workflow in a file. Raises Unreadable naming why."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise Unreadable(f"cannot read the file ({err.strerror or err})") from None
    if data.startswith(PNG_SIGNATURE) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        fmt, meta = _image_metadata(data)
        if not meta:
            raise Unreadable(
                f"a {fmt} image without ComfyUI metadata (no 'prompt' or 'workflow'); ComfyUI embeds it "
                "unless started with --disable-metadata, and many sites strip it"
            )
        api = _parse_json_text(meta["prompt"], f"the {fmt}'s 'prompt' metadata") if "prompt" in meta else None
        ui = _parse_json_text(meta["workflow"], f"the {fmt}'s 'workflow' metadata") if "workflow" in meta else None
        if _is_api(api):
            return Workflow(path, f"{fmt} metadata, API format" + (" + UI format" if _is_ui(ui) else ""), api, ui)
        if _is_ui(ui):
            return Workflow(path, f"{fmt} metadata, UI format", ui=ui)
        raise Unreadable(f"the {fmt}'s metadata holds no workflow in API or UI format")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise Unreadable(
            f"neither a PNG/WebP image nor UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    return workflow_from_json(_parse_json_text(text, "the file"), path)


# --- a live ComfyUI -------------------------------------------------------------------------------
class LiveComfy:
    """What a running ComfyUI offers: its node classes (``/object_info``) and the files of each models
    folder (``/models/<folder>``)."""

    def __init__(self, host: str, object_info: dict, folder_files: dict[str, list[str]]):
        self.host = host
        self.object_info = object_info
        self.folder_files = folder_files

    @classmethod
    def connect(cls, host: str, timeout: float = 30) -> LiveComfy:
        base = host.rstrip("/") if "://" in host else f"http://{host.rstrip('/')}"

        def get(path: str) -> Any:
            try:
                with urllib.request.urlopen(base + path, timeout=timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as err:
                raise Unreadable(f"ComfyUI at {host} answered {err.code} to GET {path}") from None
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise Unreadable(f"cannot reach ComfyUI at {host} ({reason})") from None
            except ValueError:
                raise Unreadable(f"ComfyUI at {host} did not answer GET {path} with JSON") from None

        object_info = get("/object_info")
        folders = [f for f in get("/models") if isinstance(f, str) and f != "custom_nodes"]
        files = {f: [x for x in get(f"/models/{quote(f)}") if isinstance(x, str)] for f in folders}
        return cls(host, object_info if isinstance(object_info, dict) else {}, files)

    def has_class(self, class_type: str) -> bool:
        return class_type in self.object_info

    def module_dir(self, class_type: str) -> str | None:
        """The custom_nodes folder a class comes from (None for a core class)."""
        module = str((self.object_info.get(class_type) or {}).get("python_module") or "")
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == "custom_nodes" else None

    def widgets(self, class_type: str) -> list[str] | None:
        info = self.object_info.get(class_type)
        return model_folders.widget_names(info) if isinstance(info, dict) else None

    def folder_of(self, class_type: str, input_name: str) -> str | None:
        """The models folder whose files a list input offers: the non-empty folder whose every file is
        among the input's options (the largest such folder)."""
        info = self.object_info.get(class_type) or {}
        for section in ("required", "optional"):
            spec = ((info.get("input") or {}).get(section) or {}).get(input_name)
            options = _combo_options(spec)
            if options:
                offered = set(options)
                fits = [(len(v), f) for f, v in self.folder_files.items() if v and set(v) <= offered]
                return max(fits)[1] if fits else None
        return None


def _combo_options(spec: Any) -> list | None:
    if not isinstance(spec, list) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if len(spec) > 1 and isinstance(spec[1], dict) and isinstance(spec[1].get("options"), list):
        return spec[1]["options"]
    return None


# --- what a workflow needs ------------------------------------------------------------------------
@dataclass
class ModelRef:
    """One model file a node loads."""

    workflow: str
    node_id: str
    class_type: str
    input: str | None  # None: known only from the node's properties.models
    name: str  # the value as the workflow has it (may hold a subfolder: "wan/x.safetensors")
    folder: str | None  # the folder its loader reads (ComfyUI's name), None when not known
    directory: str | None = None  # properties.models "directory", as written
    url: str | None = None
    inactive: str | None = None  # "bypassed", "muted", ... : the node does not run
    status: str = ""
    detail: str = ""
    fixed: str | None = None  # the value to write instead (a Windows path: "wan\\x" -> "wan/x")
    url_source: str | None = None  # "embedded" (properties.models) or "model-list" (model-list.json)
    folder_source: str | None = None  # "loader", "model-list", "pack-loader", or None (not known)


@dataclass
class NodeUse:
    """One node of a class core ComfyUI may not provide."""

    workflow: str
    node_id: str
    class_type: str
    cnr_id: str | None = None
    aux_id: str | None = None
    ver: str | None = None
    inactive: str | None = None
    status: str = ""
    detail: str = ""
    repo: str | None = None  # the git URL of the pack that provides the class, None when not known
    repo_source: str | None = None  # cnr_id, aux_id, config, comfy-host, node-map, component, frontend-only


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


class Extractor:
    """The model files and node classes of one workflow."""

    def __init__(self, workflow: Workflow, live: LiveComfy | None):
        self.wf = workflow
        self.live = live
        self.models: list[ModelRef] = []
        self.nodes: list[NodeUse] = []

    def model_inputs(self, class_type: str) -> dict[str, str]:
        """input name -> folder for a class: the core loader table, then a live ComfyUI's list inputs."""
        found = dict((model_folders.LOADERS.get(class_type) or model_folders.Loader(())).files)
        if self.live is not None and self.live.has_class(class_type):
            info = self.live.object_info[class_type]
            for section in ("required", "optional"):
                for name in (info.get("input") or {}).get(section) or {}:
                    if name not in found and (folder := self.live.folder_of(class_type, name)):
                        found[name] = folder
        return found

    def run(self) -> ModelRefsAndNodes:
        if self.wf.api is not None:
            self._from_api(self.wf.api)
            if self.wf.ui is not None:
                self._enrich_from_ui(self.wf.ui)
        elif self.wf.ui is not None:
            self._from_ui(self.wf.ui)
        return self.models, self.nodes

    # API format: the inputs are named
    def _from_api(self, api: dict) -> None:
        for node_id, node in api.items():
            class_type = node["class_type"]
            self.nodes.append(NodeUse(self.wf.path, str(node_id), class_type))
            inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
            known = self.model_inputs(class_type)
            for name, folder in known.items():
                value = _text(inputs.get(name))
                if value and model_folders.is_model_file(folder, value):
                    self.models.append(ModelRef(self.wf.path, str(node_id), class_type, name, value, folder))
            for name, value in inputs.items():
                if (
                    name not in known
                    and class_type not in FRONTEND_ONLY_PACKS
                    and model_folders.looks_like_model_file(value)
                ):
                    self.models.append(ModelRef(self.wf.path, str(node_id), class_type, name, value.strip(), None))

    def _enrich_from_ui(self, ui: dict) -> None:
        """Sources the UI format knows and the API format does not: model URLs, node packs."""
        sub = Extractor(Workflow(self.wf.path, "", ui=ui), self.live)
        sub._from_ui(ui)
        urls: dict[str, ModelRef] = {}
        for ref in sub.models:
            if ref.url:
                urls.setdefault(ref.name, ref)
                urls.setdefault(ref.name.replace("\\", "/").rsplit("/", 1)[-1], ref)
        for ref in self.models:
            known = urls.get(ref.name) or urls.get(ref.name.replace("\\", "/").rsplit("/", 1)[-1])
            if known:
                ref.url, ref.directory, ref.url_source = known.url, known.directory, known.url_source
        packs = {n.class_type: n for n in sub.nodes if n.cnr_id or n.aux_id}
        for use in self.nodes:
            if use.class_type in packs:
                src = packs[use.class_type]
                use.cnr_id, use.aux_id, use.ver = src.cnr_id, src.aux_id, src.ver

    # UI format: widget values by position, properties.models, subgraphs
    def _from_ui(self, ui: dict) -> None:
        definitions = ui.get("definitions") if isinstance(ui.get("definitions"), dict) else {}
        subgraphs = {
            sg["id"]: sg for sg in definitions.get("subgraphs") or [] if isinstance(sg, dict) and _text(sg.get("id"))
        }
        subgraphs.update(_group_nodes(ui))
        used: set[str] = set()
        self._walk(ui.get("nodes") or [], subgraphs, "", None, used, 0)
        for sg_id, sg in subgraphs.items():
            if sg_id not in used and not any(subgraphs[u] is sg for u in used) and not sg_id.startswith("workflow/"):
                name = _text(sg.get("name")) or sg_id
                self._walk(sg.get("nodes") or [], subgraphs, f"{name}:", "in a subgraph no node uses", used, 1)

    def _walk(self, nodes: list, subgraphs: dict, prefix: str, inactive: str | None, used: set, depth: int) -> None:
        if depth > MAX_SUBGRAPH_DEPTH:
            raise Unreadable(
                f"subgraphs nested deeper than {MAX_SUBGRAPH_DEPTH} levels (a subgraph that contains itself?)"
            )
        for node in nodes:
            if not isinstance(node, dict) or not _text(node.get("type")):
                continue
            node_id = f"{prefix}{node.get('id')}"
            class_type = node["type"]
            off = inactive or INACTIVE_MODES.get(node.get("mode"))
            if class_type in subgraphs:
                used.add(class_type)
                self._walk(subgraphs[class_type].get("nodes") or [], subgraphs, f"{node_id}:", off, used, depth + 1)
                continue
            if class_type in FRONTEND_ONLY or (
                class_type in FRONTEND_ONLY_PACKS and FRONTEND_ONLY_PACKS[class_type] is None
            ):
                continue  # ComfyUI's own frontend draws it: nothing to report
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            self.nodes.append(
                NodeUse(
                    self.wf.path,
                    node_id,
                    class_type,
                    _text(props.get("cnr_id")),
                    _text(props.get("aux_id")),
                    _text(str(props["ver"])) if props.get("ver") is not None else None,
                    off,
                )
            )
            refs = self._widget_models(node, node_id, class_type, off)
            self._property_models(props, refs, node_id, class_type, off)
            self.models.extend(refs)

    def _widget_models(self, node: dict, node_id: str, class_type: str, off: str | None) -> list[ModelRef]:
        inputs = self.model_inputs(class_type)
        values = node.get("widgets_values")
        if values is None or class_type in FRONTEND_ONLY_PACKS:
            return []
        if isinstance(values, dict):
            named = values
        else:
            table = model_folders.LOADERS.get(class_type) or model_folders.PACK_LOADERS.get(class_type)
            names = (self.live.widgets(class_type) if self.live else None) or (table.widgets if table else [])
            values = values if isinstance(values, list) else []
            named = dict(zip(names, values, strict=False))
            named.update({f"widgets_values[{i}]": v for i, v in enumerate(values[len(names) :], len(names))})
        refs = []
        for name, folder in inputs.items():
            value = _text(named.get(name))
            if value and model_folders.is_model_file(folder, value):
                refs.append(ModelRef(self.wf.path, node_id, class_type, name, value, folder, inactive=off))
        for name, value in named.items():  # a custom loader's input: a value that names a model file
            if name not in inputs and model_folders.looks_like_model_file(value):
                refs.append(ModelRef(self.wf.path, node_id, class_type, name, value.strip(), None, inactive=off))
        return refs

    def _property_models(self, props: dict, refs: list[ModelRef], node_id: str, class_type: str, off) -> None:
        for entry in props.get("models") or []:
            if not isinstance(entry, dict) or not _text(entry.get("name")):
                continue
            name, url, directory = entry["name"], _text(entry.get("url")), _text(entry.get("directory"))
            base = name.replace("\\", "/").rsplit("/", 1)[-1]
            ref = next((r for r in refs if r.name == name), None) or next(
                (r for r in refs if r.name.replace("\\", "/").rsplit("/", 1)[-1] == base), None
            )
            if ref is None:
                folder = model_folders.canonical(directory) if directory else None
                ref = ModelRef(self.wf.path, node_id, class_type, None, name, folder, inactive=off)
                refs.append(ref)
            if url and not ref.url:
                ref.url, ref.url_source = url, "embedded"
            ref.directory = ref.directory or directory


def _group_nodes(ui: dict) -> dict[str, dict]:
    """Old-style group nodes (``extra.groupNodes``; a node of type ``workflow>Name``, ``workflow/Name``
    in older frontends) as subgraphs: the frontend expands them into their nodes before /prompt."""
    extra = ui.get("extra") if isinstance(ui.get("extra"), dict) else {}
    groups = extra.get("groupNodes") if isinstance(extra.get("groupNodes"), dict) else {}
    out = {}
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("nodes"), list):
            continue
        nodes = [
            {**n, "id": n.get("id", n.get("index", i))} for i, n in enumerate(group["nodes"]) if isinstance(n, dict)
        ]
        for sep in (">", "/"):
            out[f"workflow{sep}{name}"] = {"name": f"group node {name}", "nodes": nodes}
    return out


ModelRefsAndNodes = tuple[list[ModelRef], list[NodeUse]]


# --- judging against the config -------------------------------------------------------------------
@dataclass
class ConfigFile:
    """A config model entry where it lands: its first folder and the rest of the path."""

    index: int
    entry: ModelEntry
    top: str
    rel: str

    @property
    def shown(self) -> str:
        return f"models/{self.top}/{self.rel}"


def config_files(cfg: WorkerConfig) -> list[ConfigFile]:
    out = []
    for i, entry in enumerate(cfg.models):
        top, _, rel = entry.planned_path().partition("/")
        out.append(ConfigFile(i, entry, top, rel))
    return out


def _norm(name: str) -> str:
    return name.replace("\\", "/").strip("/")


def _base(name: str) -> str:
    return _norm(name).rsplit("/", 1)[-1]


def _where(ref: ModelRef | NodeUse) -> str:
    return f"node {ref.node_id} ({ref.class_type})"


def _ref_label(ref: ModelRef) -> str:
    return f"{_where(ref)} input {ref.input!r}" if ref.input else f"{_where(ref)} model"


def judge_model(ref: ModelRef, files: list[ConfigFile], source: str) -> None:
    """``ref.status``: provided, missing, wrong_folder, or backslash (a Windows-style path ComfyUI on
    Linux rejects, whatever the config provides: never provided)."""
    _judge_model_path(ref, files, source)
    if "\\" not in ref.name:
        return
    ref.fixed = _norm(ref.name)
    problem = (
        f"model file {ref.name!r} has a '\\' in its path (saved on Windows): ComfyUI on Linux names files in "
        f"subfolders with '/' and rejects this value; use {ref.fixed!r} in the workflow"
    )
    if ref.status == "provided":
        ref.status, ref.detail = "backslash", f"{problem} ({source} provides that: {ref.detail})"
    else:
        ref.detail = f"{problem}; and: {ref.detail}"


def _judge_model_path(ref: ModelRef, files: list[ConfigFile], source: str) -> None:
    name = _norm(ref.name)
    folder = ref.folder or (model_folders.canonical(ref.directory) if ref.directory else None)
    if folder is None:
        exact = [f for f in files if f.rel == name]
        if exact:
            ref.status, ref.detail = "provided", f"models[{exact[0].index}] ({exact[0].shown}; folder not checked)"
            return
        if ref.input is not None and ref.directory is None:  # a custom node's input, known by its extension
            ref.status = "folder_unknown"
            ref.detail = (
                f"model file {ref.name!r} of a custom node: its folder is not known (no loader table, not in "
                f"model-list.json) and {source} does not have it; if the node does not download it itself, "
                "add it with the right destination"
            )
            return
        ref.status = "missing"
        ref.detail = f"model file {ref.name!r} is not in {source} (its folder is not known: set its destination)"
        return
    dirs = model_folders.dirs_read(folder)
    exact = [f for f in files if f.top in dirs and f.rel == name]
    if exact:
        ref.status, ref.detail = "provided", f"models[{exact[0].index}] ({exact[0].shown})"
        return
    elsewhere = [f for f in files if _base(f.rel) == _base(name)]
    if elsewhere:
        f = elsewhere[0]
        ref.status = "wrong_folder"
        ref.detail = (
            f"model file {ref.name!r}: {source} puts it at {f.shown} (models[{f.index}]), "
            f"but {ref.class_type} reads {model_folders.shown_dirs(folder)}"
        )
        return
    ref.status = "missing"
    ref.detail = (
        f"model file {ref.name!r} is not in {source} ({ref.class_type} reads {model_folders.shown_dirs(folder)})"
    )


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _repo_path(url: str) -> str:
    """``owner/repo`` of a git URL (https, ssh or scp form), lower-case, without ``.git``."""
    path = re.sub(r"^[a-z+]+://[^/]+/|^[^@/]+@[^:]+:", "", url.strip().lower()).strip("/")
    return path[:-4] if path.endswith(".git") else path


def config_node_for(use: NodeUse, cfg: WorkerConfig) -> tuple[int, NodeEntry] | None:
    """The config node entry that installs a node's pack (by GitHub repo from ``aux_id``, else by the
    registry id ``cnr_id`` compared with the folder name)."""
    for i, node in enumerate(cfg.nodes):
        if use.aux_id and (
            _repo_path(node.url).endswith(use.aux_id.lower().strip("/"))
            or _key(node.dir_name()) == _key(use.aux_id.rsplit("/", 1)[-1])
        ):
            return i, node
        if use.cnr_id and _key(node.dir_name()) == _key(use.cnr_id):
            return i, node
    return None


def config_node_by_dir(dir_name: str, cfg: WorkerConfig) -> tuple[int, NodeEntry] | None:
    for i, node in enumerate(cfg.nodes):
        if node.dir_name() == dir_name or _key(node.dir_name()) == _key(dir_name):
            return i, node
    return None


class Packs:
    """The node pack data (comfy_worker/node_packs.py), loaded on first use: a workflow of core nodes
    only never asks the network."""

    def __init__(self, settings: Settings, offline: bool):
        self.settings, self.offline = settings, offline
        self._packs: NodePacks | None = None
        self.cache = node_packs.DataCache(node_packs.cache_dir(settings.user_cache_dir), offline)

    def get(self) -> NodePacks:
        if self._packs is None:
            urls = {
                "node_map": self.settings.node_map_url,
                "stats": self.settings.node_stats_url,
                "model_list": self.settings.model_list_url,
                "registry": self.settings.registry_url,
            }
            self._packs = NodePacks.load(urls, self.cache)
        return self._packs

    @property
    def loaded(self) -> bool:
        return self._packs is not None

    def unavailable(self) -> str:
        """Why node packs could not be looked up ('' when they could)."""
        packs = self.get()
        if packs.available:
            return ""
        return "; ".join(p for p in self.cache.problems if "node map" in p) or "the node map could not be had"


def _pack(use: NodeUse) -> str:
    if use.repo:
        return use.repo
    if use.aux_id:
        return f"https://github.com/{use.aux_id}"
    if use.cnr_id:
        return f"the Comfy Registry pack {use.cnr_id!r}"
    return ""


def _config_node_by_repo(repo: str, cfg: WorkerConfig) -> tuple[int, NodeEntry] | None:
    key = repo_key(repo)
    return next(((i, n) for i, n in enumerate(cfg.nodes) if repo_key(n.url) == key), None)


def resolve_pack(
    use: NodeUse, cfg: WorkerConfig, live: LiveComfy | None, packs: Packs | None, classes: set[str]
) -> None:
    """``use.repo`` and ``use.repo_source``, by precedence: the workflow's ``aux_id``/``cnr_id``, the
    config's own nodes, the live ComfyUI's custom_nodes folder, then the node map's best candidate."""
    if use.class_type in FRONTEND_ONLY_PACKS:
        use.repo, use.repo_source = FRONTEND_ONLY_PACKS[use.class_type], "frontend-only"
        return
    if COMPONENT_RE.match(use.class_type):
        use.repo, use.repo_source = IMPACT_PACK, "component"
        return
    if use.aux_id:
        use.repo, use.repo_source = f"https://github.com/{use.aux_id.strip('/')}", "aux_id"
        return
    if use.cnr_id and use.cnr_id != "comfy-core" and packs is not None:
        repo = packs.get().registry_repo(use.cnr_id)
        if repo:
            use.repo, use.repo_source = repo, "cnr_id"
            return
    if use.cnr_id == "comfy-core" or (use.class_type in CORE_NODE_CLASSES and not use.cnr_id):
        return
    map_ = packs.get() if packs is not None else None
    candidates = map_.candidates(use.class_type) if map_ else []
    mine = next((m for c in candidates if (m := _config_node_by_repo(c, cfg))), None)
    if mine:
        use.repo, use.repo_source = mine[1].url, "config"
        return
    if live is not None and (module_dir := live.module_dir(use.class_type)):
        found = next((c for c in candidates if _key(c.rstrip("/").rsplit("/", 1)[-1]) == _key(module_dir)), None)
        match = config_node_by_dir(module_dir, cfg)
        if found or match:
            use.repo, use.repo_source = found or match[1].url, "comfy-host"
            return
    if map_ is not None and not map_.is_core(use.class_type):
        choice = map_.choose(use.class_type, classes)
        use.repo, use.repo_source = choice.repo, ("node-map" if choice.repo else None)


def _installed_by(use: NodeUse, cfg: WorkerConfig) -> tuple[int, NodeEntry] | None:
    return (_config_node_by_repo(use.repo, cfg) if use.repo else None) or config_node_for(use, cfg)


def judge_node(
    use: NodeUse, cfg: WorkerConfig, source: str, live: LiveComfy | None, packs: Packs | None = None
) -> None:
    if use.repo_source == "frontend-only":
        use.status = "frontend_only"
        use.detail = f"drawn by the frontend of {use.repo}: never sent to the server, nothing to install there"
        return
    if live is not None:
        if live.has_class(use.class_type):
            module_dir = live.module_dir(use.class_type)
            if module_dir is None:
                use.status, use.detail = "core", "core ComfyUI"
                return
            match = config_node_by_dir(module_dir, cfg) or _installed_by(use, cfg)
            if match:
                use.status, use.detail = "provided", f"nodes[{match[0]}] ({match[1].url})"
                return
            use.status = "not_in_config"
            use.detail = f"installed on {live.host} from custom_nodes/{module_dir}, which {source} does not install"
            return
        use.status = "not_installed"
        match = _installed_by(use, cfg)
        hint = (
            f"; {source} installs nodes[{match[0]}] ({match[1].url}): is that ComfyUI provisioned with it?"
            if match
            else (f"; it comes from {_pack(use)}" if _pack(use) else "")
        )
        use.detail = f"class not installed on ComfyUI at {live.host}{hint}"
        return
    in_core = _core_class(use) or (
        not use.cnr_id and packs is not None and packs.loaded and packs.get().is_core(use.class_type)
    )
    if in_core and not use.repo:
        if use.class_type not in CORE_NODE_CLASSES and cfg.comfyui_ref() == CORE_COMFYUI_VERSION:
            use.status = "needs_newer_comfyui"
            use.detail = (
                f"a core class of ComfyUI {use.ver or '(newer)'} that ComfyUI {CORE_COMFYUI_VERSION} "
                f"({source}'s comfyui.ref) does not have; set comfyui.ref to a newer release"
            )
            return
        use.status, use.detail = "core", "core ComfyUI"
        return
    if use.repo or use.aux_id or use.cnr_id:
        match = _installed_by(use, cfg)
        if match:
            use.status, use.detail = "provided", f"nodes[{match[0]}] ({match[1].url})"
            return
        what = (
            "an Impact Pack component (defined outside the workflow)"
            if use.repo_source == "component"
            else ("custom node class")
        )
        use.status, use.detail = "missing", f"{what} from {_pack(use)}, which {source} does not install"
        return
    use.status = "unknown"
    why = packs.unavailable() if packs is not None else "node packs were not looked up"
    use.detail = (
        f"not a class of core ComfyUI {CORE_COMFYUI_VERSION} and the workflow names no node pack "
        "(no cnr_id/aux_id: an API-format workflow never does); "
        + (f"node packs could not be looked up: {why}" if why else "no pack in ComfyUI-Manager's node map has it")
        + "; check it with --comfy-host against a ComfyUI with the config's nodes"
    )


MODEL_PROBLEMS = {"missing", "wrong_folder", "backslash"}
URL_WANTED = {"missing", "wrong_folder", "folder_unknown"}  # a file the config lacks: its URL is looked up
NODE_PROBLEMS = {"missing", "unknown", "not_installed", "not_in_config", "needs_newer_comfyui"}


# --- suggesting -----------------------------------------------------------------------------------
def _comment(text: str) -> str:
    return "# " + _CONTROL_RE.sub(" ", text)[:300]


@dataclass
class Suggestion:
    models: list[tuple[dict, list[str]]] = field(default_factory=list)  # (entry, comment lines above it)
    nodes: list[tuple[dict, list[str]]] = field(default_factory=list)
    unresolved_models: list[str] = field(default_factory=list)
    unresolved_nodes: list[str] = field(default_factory=list)
    comfyui: tuple[dict, list[str]] | None = None  # ({"ref": "v0.3.76"}, why) when a newer ComfyUI is needed

    def as_dict(self) -> dict:
        return {
            "comfyui": self.comfyui[0] if self.comfyui else None,
            "models": [e for e, _ in self.models],
            "nodes": [e for e, _ in self.nodes],
            "unresolved": self.unresolved_models + self.unresolved_nodes,
        }


def _validation_reason(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def suggest(refs: list[ModelRef], uses: list[NodeUse], files: list[ConfigFile], cfg: WorkerConfig) -> Suggestion:
    out = Suggestion()
    seen: dict[tuple[str, str], str] = {}
    for ref in refs:
        if ref.status == "skipped":
            out.unresolved_models.append(
                f"{Path(ref.workflow).name}: {_ref_label(ref)}: {ref.name!r} is not needed, {ref.detail}"
                + (f" (source: {ref.url}); --include-bypassed adds it" if ref.url else "")
            )
        if ref.status == "folder_unknown":
            out.unresolved_models.append(f"{Path(ref.workflow).name}: {_ref_label(ref)}: {ref.detail}")
        if ref.status not in MODEL_PROBLEMS:
            continue
        label = f"{Path(ref.workflow).name}: {_ref_label(ref)}" + (f" ({ref.inactive})" if ref.inactive else "")
        if ref.fixed is not None:
            out.unresolved_models.append(
                f"{label}: {'fix the workflow, not the config' if ref.status == 'backslash' else 'also fix the workflow'}: "
                f"write {ref.fixed!r} for {ref.name!r} ('/', not '\\')"
            )
            if ref.status == "backslash":
                continue  # the config provides the '/' form: only the workflow needs the fix
        folder = ref.folder or (model_folders.canonical(ref.directory) if ref.directory else None)
        dest = (
            ref.directory
            if ref.directory and (folder is None or model_folders.same_folder(ref.directory, folder))
            else folder
        )
        url = ref.url
        moved = None
        if ref.status == "wrong_folder":
            moved = next((f for f in files if _base(f.rel) == _base(ref.name)), None)
            url = url or (moved.entry.url if moved else None)
        if dest is None:
            out.unresolved_models.append(
                f"{label}: {ref.name!r}: its folder is not known; add it with the right destination"
            )
            continue
        sub, _, filename = _norm(ref.name).rpartition("/")
        destination = f"{dest}/{sub}" if sub else dest
        key = (destination.lower(), filename.lower())
        if key in seen:
            if url and seen[key] not in (url, ""):
                out.unresolved_models.append(f"{label}: {destination}/{filename} has another URL too: {url}")
            continue
        if not url:
            seen[key] = ""
            out.unresolved_models.append(
                f"{label}: no download URL for {destination}/{filename} in the workflow; add an entry with its url"
            )
            continue
        entry: dict[str, Any] = {"url": url, "destination": destination}
        if url_filename(url) != filename:
            entry["filename"] = filename
        try:
            ModelEntry(**entry)
        except ValidationError as err:
            out.unresolved_models.append(
                f"{label}: {destination}/{filename}: its URL is not usable ({_validation_reason(err)})"
            )
            continue
        seen[key] = url
        notes = [label]
        if moved is not None:
            notes.append(
                f"replaces models[{moved.index}] ({moved.shown}): the loader reads {model_folders.shown_dirs(folder or dest)}"
            )
        out.models.append((entry, notes))
    _suggest_nodes(uses, cfg, out)
    out.comfyui = suggest_comfyui(uses, cfg)
    return out


_RELEASE_RE = re.compile(r"^v?\d+\.\d+\.\d+$")


def saved_comfyui_version(uses: list[NodeUse]) -> str | None:
    """The ComfyUI version a UI-format workflow was saved with: the newest ``ver`` of its ``comfy-core``
    nodes (``properties: {"cnr_id": "comfy-core", "ver": "0.3.66"}``); None when none names one."""
    from comfy_worker.git_versions import release_version

    found = [(v, u.ver) for u in uses if u.cnr_id == "comfy-core" and u.ver and (v := release_version(u.ver))]
    return max(found)[1] if found else None


def _newer_than(saved: str | None, ref: str) -> bool:
    """Is the saved version newer than a release ref (False when either is not a version: a branch,
    a commit, ``latest``)?"""
    from comfy_worker.git_versions import release_version

    have, want = release_version(ref), release_version(saved) if saved else None
    return have is not None and want is not None and want > have


def suggest_comfyui(uses: list[NodeUse], cfg: WorkerConfig) -> tuple[dict, list[str]] | None:
    """``comfyui: {ref: vX.Y.Z}`` (the version the workflow was saved with, at least) when core classes
    are missing from the configured ComfyUI (``needs_newer_comfyui``) or the workflow was saved with a
    newer release than ``comfyui.ref``; ``latest`` when the workflow names no version that would do.
    The notes say why."""
    configured = cfg.comfyui_ref()
    saved = saved_comfyui_version(uses)
    newer = sorted({u.class_type for u in uses if u.status == "needs_newer_comfyui"})
    saved_newer = _newer_than(saved, configured)
    if not newer and not saved_newer:
        return None
    notes = []
    if newer:
        shown = ", ".join(newer[:6]) + (f" and {len(newer) - 6} more" if len(newer) > 6 else "")
        notes.append(f"core class(es) that ComfyUI {configured} (comfyui.ref) does not have: {shown}")
    if saved:
        notes.append(
            f"the workflow was saved with ComfyUI {saved}" + (f", newer than {configured}" if saved_newer else "")
        )
    if saved_newer and _RELEASE_RE.match(saved):
        ref = saved if saved.startswith("v") else f"v{saved}"
        notes.append(f"{ref} or any newer release; 'latest' takes the newest at provisioning")
    else:
        ref = "latest"
        notes.append(
            "the workflow names no newer release: 'latest' takes the newest at provisioning "
            "(recorded in comfy.lock.yml, moved by apply_config.sh --update)"
        )
    return {"ref": ref}, notes


def _suggest_nodes(uses: list[NodeUse], cfg: WorkerConfig, out: Suggestion) -> None:
    """One ``nodes:`` entry per pack (its git URL; ``version`` when the workflow saved a commit)."""
    packs: dict[str, list[NodeUse]] = {}
    for use in uses:
        if use.status in ("missing", "not_installed", "not_in_config", "unknown"):
            key = repo_key(use.repo) if use.repo else use.aux_id or use.cnr_id or f"class:{use.class_type}"
            packs.setdefault(key, []).append(use)
    for group in packs.values():
        first = group[0]
        classes = ", ".join(sorted({u.class_type for u in group}))
        if first.status == "not_installed" and _installed_by(first, cfg):
            continue  # the config installs it already; the host is not provisioned
        if first.repo:
            entry = {"url": first.repo}
            ver = next((u.ver for u in group if u.ver), None)
            if ver and _SHA_RE.match(ver):
                entry["version"] = ver
            sources = sorted({u.repo_source or "" for u in group} - {""})
            notes = [f"provides {classes} (from {', '.join(sources)})"]
            if ver and "version" not in entry:
                notes.append(f"the workflow was saved with version {ver}")
            try:
                NodeEntry(**entry)
            except ValidationError as err:
                out.unresolved_nodes.append(f"{classes}: {entry['url']} is not usable ({_validation_reason(err)})")
                continue
            out.nodes.append((entry, notes))
        elif first.cnr_id:
            ver = f", version {first.ver}" if first.ver else ""
            out.unresolved_nodes.append(
                f"{classes}: from the Comfy Registry pack {first.cnr_id!r}{ver}; the registry gave no git URL: "
                f"find it at https://registry.comfy.org/nodes/{quote(first.cnr_id)}"
            )
        elif first.status == "not_in_config":
            out.unresolved_nodes.append(f"{classes}: {first.detail}; add that node's git URL")
        else:
            out.unresolved_nodes.append(f"{classes}: no node pack known; add the git URL of the node that provides it")


def _yaml_entry(entry: dict, notes: list[str]) -> list[str]:
    lines = [f"  {_comment(n)}" for n in notes]
    dumped = yaml.safe_dump([entry], sort_keys=False, allow_unicode=True, width=10_000).splitlines()
    return lines + [f"  {line}" for line in dumped]


def suggestion_yaml(s: Suggestion, workflows: list[str]) -> str:
    lines = [_comment(f"check_workflow.py --suggest for {', '.join(Path(w).name for w in workflows)}")]
    if s.comfyui:
        entry, notes = s.comfyui
        lines += ["# Set comfyui.ref in config.yml:", "comfyui:", *(f"  {_comment(n)}" for n in notes)]
        lines.append(f"  ref: {entry['ref']}")
    lines += ["# Add these entries to the models: and nodes: lists of config.yml.", "models:"]
    for entry, notes in s.models:
        lines += _yaml_entry(entry, notes)
    lines += [f"  {_comment('not suggested: ' + u)}" for u in s.unresolved_models]
    lines.append("nodes:")
    for entry, notes in s.nodes:
        lines += _yaml_entry(entry, notes)
    lines += [f"  {_comment('not suggested: ' + u)}" for u in s.unresolved_nodes]
    return "\n".join(lines) + "\n"


# --- the run --------------------------------------------------------------------------------------
@dataclass
class Checked:
    workflow: Workflow
    models: list[ModelRef]
    nodes: list[NodeUse]
    comfyui_version: str | None = None  # the ComfyUI it was saved with (saved_comfyui_version)


def resolve_model(ref: ModelRef, packs: Packs | None, want_url: bool = True) -> None:
    """The folder of a custom loader's file (model-list.json's save_path, else the popular packs'
    loader table) and, for a file the workflow does not embed, model-list.json's URL (not with
    ``want_url=False``: check() asks for it only for a file the config does not provide, so a
    workflow whose models the config has never fetches the model list)."""
    if ref.folder is not None:
        ref.folder_source = ref.folder_source or "loader"
    if ref.folder is None and ref.directory:  # the workflow's properties.models says where
        ref.folder, ref.folder_source = model_folders.canonical(ref.directory), "directory"
    unplaced = ref.folder is None
    wanted = unplaced or (want_url and not ref.url)
    entry = packs.get().model(ref.name) if packs is not None and wanted else None
    if unplaced:
        table = model_folders.PACK_LOADERS.get(ref.class_type)
        if entry and (folder := model_folders.model_list_folder(entry)):
            ref.folder, ref.folder_source = folder, "model-list"
        elif table and ref.input in table.files:
            ref.folder, ref.folder_source = table.files[ref.input], "pack-loader"
    if want_url and not ref.url and entry and isinstance(entry.get("url"), str):
        ref.url, ref.url_source = entry["url"], "model-list"


def check(
    workflows: list[Workflow],
    cfg: WorkerConfig,
    source: str,
    live: LiveComfy | None,
    include_inactive: bool,
    packs: Packs | None = None,
) -> list[Checked]:
    files = config_files(cfg)
    out = []
    for wf in workflows:
        models, nodes = Extractor(wf, live).run()
        classes = {u.class_type for u in nodes}
        for use in nodes:
            resolve_pack(use, cfg, live, packs, classes)
        for ref in models:
            resolve_model(ref, packs, want_url=False)
            if ref.inactive and not include_inactive:
                ref.status, ref.detail = "skipped", f"the node is {ref.inactive}"
            else:
                judge_model(ref, files, source)
            if not ref.url and ref.status in URL_WANTED:
                resolve_model(ref, packs)  # a file to add: model-list.json's URL, for the suggestion
        for use in nodes:
            if use.inactive and not include_inactive:
                use.status, use.detail = "skipped", f"the node is {use.inactive}"
            else:
                judge_node(use, cfg, source, live, packs)
        out.append(Checked(wf, models, nodes, saved_comfyui_version(nodes)))
    return out


def problem_lines(checked: list[Checked]) -> list[str]:
    lines = []
    for c in checked:
        for ref in c.models:
            if ref.status in MODEL_PROBLEMS:
                lines.append(f"{c.workflow.path}: {_ref_label(ref)}: {ref.detail}")
        by_class: dict[tuple[str, str], list[NodeUse]] = {}
        for use in c.nodes:
            if use.status in NODE_PROBLEMS:
                by_class.setdefault((use.class_type, use.detail), []).append(use)
        for (class_type, detail), group in by_class.items():
            ids = ", ".join(u.node_id for u in group)
            lines.append(f"{c.workflow.path}: node{'s' if len(group) > 1 else ''} {ids} ({class_type}): {detail}")
    return lines


def human_report(
    checked: list[Checked],
    errors: list[str],
    source: str,
    problems: list[str],
    lookups: list[str] = (),
    comfyui_ref: str | None = None,
) -> str:
    out = [f"config: {source}"]
    for c in checked:
        custom = [u for u in c.nodes if u.status != "core" and not _core_class(u)]
        out.append(f"{c.workflow.path} ({c.workflow.kind}): {len(c.models)} model file(s), {len(c.nodes)} node(s)")
        if c.comfyui_version:
            newer = comfyui_ref is not None and _newer_than(c.comfyui_version, comfyui_ref)
            out.append(
                f"  saved with ComfyUI {c.comfyui_version}"
                + (
                    f", newer than {comfyui_ref} (comfyui.ref): --suggest proposes a newer comfyui.ref"
                    if newer
                    else (f"; comfyui.ref is {comfyui_ref}" if comfyui_ref else "")
                )
            )
        for ref in c.models:
            where = f"{ref.folder or ref.directory or '?'}/{ref.name}"
            out.append(f"  {ref.status:<13} {where}  [{_ref_label(ref)}]")
        seen = set()
        for use in custom:
            if (use.class_type, use.status) in seen:
                continue
            seen.add((use.class_type, use.status))
            pack = f" from {_pack(use)}" if _pack(use) else ""
            pack += f" ({use.repo_source})" if use.repo_source else ""
            out.append(f"  {use.status:<13} node class {use.class_type}{pack}")
    out += [f"not looked up: {note}" for note in lookups]
    for err in errors:
        out.append(f"error: {err}")
    if problems:
        out.append(f"problems ({len(problems)}):")
        out += [f"  {p}" for p in problems]
        out.append("run with --suggest for the config.yml entries to add")
    elif not errors:
        out.append(f"ok: {source} provides every model file and node these workflows need")
    return "\n".join(out)


def _lookup_notes(packs: Packs) -> list[str]:
    """What could not be looked up: everything that could not be fetched and is not cached in one
    line (naming each and the way out), then each other problem (``--offline`` and not cached)."""
    if not packs.loaded:
        return []
    cache = packs.cache
    shown = {f"cannot fetch {w} from {u} ({r}) and it is not cached" for w, u, r in cache.unreachable}
    notes = []
    if cache.unreachable:
        reached = "; ".join(dict.fromkeys(f"{w} at {u} ({r})" for w, u, r in cache.unreachable))
        notes.append(
            f"could not reach {reached}, and none of it is cached ({cache.directory}): node packs and model "
            "URLs are unknown; run once with network access, after which --offline uses the cache"
        )
    notes += [p for p in dict.fromkeys(cache.problems) if p not in shown]
    return notes


def _core_class(use: NodeUse) -> bool:
    return use.cnr_id == "comfy-core" or (use.class_type in CORE_NODE_CLASSES and not use.aux_id)


def _asdict(item: ModelRef | NodeUse) -> dict:
    data = asdict(item)
    data.pop("workflow", None)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="check_workflow.py",
        description="Check that config.yml provides every model file and custom node a workflow needs.",
    )
    parser.add_argument("workflows", nargs="+", metavar="WORKFLOW", help="API/UI-format JSON, job JSON, or PNG/WebP")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: env CONFIG_YML, else $VOLUME_ROOT/config.yml, else $APP_DIR/config.yml)",
    )
    parser.add_argument(
        "--comfy-host", metavar="H", help="a running ComfyUI (host:port) to ask for its nodes and models"
    )
    parser.add_argument("--suggest", action="store_true", help="print the config.yml entries to add (YAML on stdout)")
    parser.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    parser.add_argument(
        "--include-bypassed",
        action="store_true",
        help="also require what bypassed or muted nodes (and unused subgraphs) load",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="look node packs and models up in the cache only (no network); see docs/check_workflow.md",
    )
    args = parser.parse_args(argv)

    errors: list[str] = []
    try:
        settings = Settings.from_env()
        cfg, source = load_selected_config(args.config, settings)
    except ValueError as err:
        return _fail(args, [str(err)])
    except ConfigError as err:
        return _fail(args, [f"{err.source} is invalid: {p}" for p in err.problems])
    live = None
    if args.comfy_host:
        try:
            live = LiveComfy.connect(args.comfy_host)
        except Unreadable as err:
            return _fail(args, [str(err)])
    workflows = []
    for path in args.workflows:
        try:
            workflows.append(read_workflow(path))
        except Unreadable as err:
            errors.append(f"{path}: {err}")
    try:
        packs = Packs(settings, args.offline)
        checked = check(workflows, cfg, source, live, args.include_bypassed, packs)
    except Unreadable as err:  # a malformed structure found while walking (subgraph loop)
        return _fail(args, [str(err)])
    problems = problem_lines(checked)
    lookups = _lookup_notes(packs)
    code = EXIT_UNREADABLE if errors else EXIT_MISSING if problems else EXIT_OK
    suggestion = suggest(
        [r for c in checked for r in c.models], [u for c in checked for u in c.nodes], config_files(cfg), cfg
    )
    suggested = suggestion_yaml(suggestion, [w.path for w in workflows])
    if args.json:
        report = {
            "exit_code": code,
            "config": source,
            "comfy_host": args.comfy_host,
            "errors": errors,
            "problems": problems,
            "node_packs": {"looked_up": packs.loaded, "sources": packs.cache.sources, "problems": lookups},
            "comfyui": {
                "ref": cfg.comfyui_ref(),
                "saved_with": saved_comfyui_version([u for c in checked for u in c.nodes]),
            },
            "workflows": [
                {
                    "path": c.workflow.path,
                    "format": c.workflow.kind,
                    "comfyui_version": c.comfyui_version,
                    "models": [_asdict(r) for r in c.models],
                    "nodes": [_asdict(u) for u in c.nodes],
                }
                for c in checked
            ],
            "suggestion": suggestion.as_dict(),
        }
        if args.suggest:
            report["suggestion_yaml"] = suggested
        print(json.dumps(report, indent=2))
        return code
    report_text = human_report(checked, errors, source, problems, lookups, cfg.comfyui_ref())
    if args.suggest:
        print(report_text, file=sys.stderr)
        sys.stdout.write(suggested)
    else:
        print(report_text)
    return code


def _fail(args: argparse.Namespace, errors: list[str]) -> int:
    if args.json:
        print(json.dumps({"exit_code": EXIT_UNREADABLE, "errors": errors, "problems": [], "workflows": []}, indent=2))
    else:
        for err in errors:
            print(f"error: {err}", file=sys.stderr)
    return EXIT_UNREADABLE


def config_for_workflows(workflows: list[str], config: Path, settings: Settings) -> tuple[str, list[str], list[str]]:
    """For ``deploy.sh --from-workflow``: (the config's YAML with the suggested models and nodes added,
    the problems the workflows still have against that config, what could not be suggested). An
    unreadable workflow or an invalid config is a problem too. Nothing is written."""
    from comfy_worker.config_schema import load_config_text

    try:
        cfg = load_selected_config(str(config), settings)[0]
    except ConfigError as err:
        return "", [f"{err.source} is invalid: {p}" for p in err.problems], []
    wfs, unreadable = [], []
    for path in workflows:
        try:
            wfs.append(read_workflow(path))
        except Unreadable as err:
            unreadable.append(f"{path}: {err}")
    if unreadable:
        return "", unreadable, []
    packs = Packs(settings, offline=False)
    try:
        checked = check(wfs, cfg, str(config), None, False, packs)
    except Unreadable as err:
        return "", [str(err)], []
    s = suggest([r for c in checked for r in c.models], [u for c in checked for u in c.nodes], config_files(cfg), cfg)
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for key, entries in (("models", s.models), ("nodes", s.nodes)):
        raw[key] = list(raw.get(key) or []) + [entry for entry, _ in entries]
    names = ", ".join(Path(w).name for w in workflows)
    merged = f"# {config.name} with the entries {names} needs (deploy.sh --from-workflow)\n" + yaml.safe_dump(
        raw, sort_keys=False, allow_unicode=True, width=10_000
    )
    try:
        merged_cfg = load_config_text(merged, str(config))
    except ConfigError as err:
        return merged, [f"the config with the suggested entries is invalid: {p}" for p in err.problems], []
    problems = problem_lines(check(wfs, merged_cfg, str(config), None, False, packs))
    problems += _lookup_notes(packs) if problems else []
    return merged, problems, s.unresolved_models + s.unresolved_nodes
