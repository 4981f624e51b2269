"""Collect, deliver and clean up the outputs of one prompt (docs/api.md, "Output").

Every saved file of every node under any output key is delivered (``temp`` previews are skipped),
classified into ``images`` / ``files`` by content type, read from ComfyUI's output folder on disk
when it is there (``/view`` otherwise), and returned as base64 or S3 URLs. ``text`` outputs are
collected as they are. ComfyUI's folders follow ``COMFY_ARGS`` (``--output-directory``,
``--input-directory``, ``--temp-directory``, ``--base-directory``), as ComfyUI itself resolves them.
Clean-up removes only files this job's prompt created (changed no earlier than the prompt was queued).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from comfy_worker.comfy_client import ComfyClient
from comfy_worker.job_errors import JobError

log = logging.getLogger(__name__)
# a file whose status changed this long before the prompt was queued is not the prompt's (file times come
# from the kernel's coarse clock, which may lag time.time() by a few milliseconds)
CLOCK_SLACK_S = 0.05


class Uploader(Protocol):
    """Where outputs go when S3 is configured (``s3_upload.S3Uploader``)."""

    def upload(self, job_id: str, filename: str, content_type: str, *, path: Path | None = None, data=None) -> str:
        """Upload one file (from ``path`` or bytes ``data``) and return its URL. Blocking."""
        ...


_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".glb": "model/gltf-binary",
    ".gltf": "model/gltf+json",
    ".obj": "model/obj",
    ".json": "application/json",
    ".txt": "text/plain",
}


@dataclass(frozen=True)
class ComfyFolders:
    """ComfyUI's output, input and temp folders."""

    output: Path
    input: Path
    temp: Path

    @classmethod
    def of(cls, comfyui_path: Path, comfy_args: str = "") -> ComfyFolders:
        """The folders of the ComfyUI in ``comfyui_path`` started with ``comfy_args`` (as main.py resolves them)."""
        try:
            words = shlex.split(comfy_args or "")
        except ValueError:
            words = (comfy_args or "").split()
        given: dict[str, str] = {}
        for i, word in enumerate(words):
            name, eq, value = word.partition("=")
            if name in ("--base-directory", "--output-directory", "--input-directory", "--temp-directory"):
                value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
                if value:
                    given[name] = value
        base = Path(given.get("--base-directory") or comfyui_path)
        return cls(
            output=Path(given.get("--output-directory") or base / "output"),
            input=Path(given.get("--input-directory") or base / "input"),
            temp=Path(given["--temp-directory"]) / "temp" if "--temp-directory" in given else base / "temp",
        )

    def folder(self, type_: str) -> Path | None:
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(type_)


def as_folders(where: ComfyFolders | Path) -> ComfyFolders:
    return where if isinstance(where, ComfyFolders) else ComfyFolders.of(Path(where))


def content_type_of(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    return _TYPES.get(suffix) or mimetypes.guess_type(filename)[0] or "application/octet-stream"


@dataclass
class OutputFile:
    node_id: str
    filename: str
    subfolder: str
    type: str

    @property
    def content_type(self) -> str:
        return content_type_of(self.filename)

    def local_path(self, folders: ComfyFolders | Path) -> Path | None:
        """The file inside ComfyUI's folder for its type (``folders``, or a ComfyUI path with the default
        folders), or None if that would leave the folder."""
        folder = as_folders(folders).folder(self.type)
        if folder is None:
            return None
        base = folder.resolve()
        path = (base / self.subfolder / self.filename).resolve()
        return path if path.is_relative_to(base) and path != base else None


def collect(outputs: dict[str, dict]) -> tuple[list[OutputFile], list[dict]]:
    """All files (every type, temp included, for clean-up) and text outputs from ComfyUI's ui outputs."""
    files: list[OutputFile] = []
    texts: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    ref = OutputFile(
                        str(node_id), item["filename"], item.get("subfolder") or "", item.get("type") or "output"
                    )
                    ident = (ref.type, ref.subfolder, ref.filename)
                    if ident not in seen:
                        seen.add(ident)
                        files.append(ref)
                elif key == "text" and isinstance(item, str):
                    texts.append({"node_id": str(node_id), "text": item})
    return files, texts


async def _read(
    client: ComfyClient, comfyui_path: ComfyFolders | Path, ref: OutputFile
) -> tuple[bytes | None, Path | None]:
    path = ref.local_path(comfyui_path)
    if path is not None and path.is_file():
        size = path.stat().st_size
        data = path.read_bytes() if size < 8 * 1024 * 1024 else await asyncio.to_thread(path.read_bytes)
        return data, path
    return await client.view(ref.filename, ref.subfolder, ref.type), None


async def _to_s3(
    client: ComfyClient, comfyui_path: ComfyFolders | Path, ref: OutputFile, s3: Uploader, job_id: str, name: str
):
    path = ref.local_path(comfyui_path)
    if path is not None and path.is_file():  # streamed from disk
        url = await asyncio.to_thread(s3.upload, job_id, name, ref.content_type, path=path)
    else:
        data = await client.view(ref.filename, ref.subfolder, ref.type)
        url = await asyncio.to_thread(s3.upload, job_id, name, ref.content_type, data=data)
    return {"filename": ref.filename, "type": "s3_url", "data": url}


def s3_names(files: list[OutputFile]) -> list[str]:
    """A distinct name per file for its S3 key: the file name, or (when two files share it) the name under
    its subfolder, else under its node id; never an empty path part."""
    names: list[str] = []
    for ref in files:
        candidates = [ref.filename, "/".join(p for p in (*ref.subfolder.split("/"), ref.filename) if p)]
        candidates.append(f"{ref.node_id}/{candidates[-1]}")
        name = next((c for c in candidates if c not in names), None)
        n = 2
        while name is None or name in names:
            name = f"{ref.node_id}-{n}/{candidates[1]}"
            n += 1
        names.append(name)
    return names


async def deliver(
    files: list[OutputFile],
    *,
    client: ComfyClient,
    comfyui_path: ComfyFolders | Path,
    job_id: str,
    s3: Uploader | None,
    max_response_mb: float,
) -> tuple[list[dict], list[dict], list[str]]:
    """Return (images, files, errors) entries for every non-temp file (S3 uploads run in parallel)."""
    wanted = [f for f in files if f.type != "temp"]
    results: list[dict | BaseException] = []
    if s3 is not None:
        names = s3_names(wanted)
        tasks = [_to_s3(client, comfyui_path, ref, s3, job_id, name) for ref, name in zip(wanted, names, strict=True)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
    else:
        _check_size(wanted, comfyui_path, max_response_mb)
        encoded_bytes = 0  # files fetched with /view were not in the up-front size check
        for ref in wanted:
            try:
                data, _ = await _read(client, comfyui_path, ref)
            except Exception as exc:  # one bad file must not lose the others
                results.append(exc)
                continue
            encoded_bytes += len(data)
            _too_big(encoded_bytes, max_response_mb, {ref.filename: len(data)})
            results.append({"filename": ref.filename, "type": "base64", "data": base64.b64encode(data).decode()})
    images_out: list[dict] = []
    files_out: list[dict] = []
    errors: list[str] = []
    for ref, entry in zip(wanted, results, strict=True):
        if isinstance(entry, BaseException):
            log.warning("Could not deliver %s from node %s: %s", ref.filename, ref.node_id, entry)
            errors.append(f"Output {ref.filename!r} of node {ref.node_id} could not be delivered: {entry}")
            continue
        entry.update(node_id=ref.node_id, content_type=ref.content_type)
        (images_out if ref.content_type.startswith("image/") else files_out).append(entry)
    if wanted and not images_out and not files_out:
        raise JobError(
            f"None of the {len(wanted)} output file(s) could be delivered: {errors[0]}",
            {"errors": errors},
        )
    return images_out, files_out, errors


def _check_size(files: list[OutputFile], comfyui_path: ComfyFolders | Path, max_response_mb: float) -> None:
    """Fail before encoding when base64 output would exceed MAX_RESPONSE_MB (RunPod rejects it opaquely)."""
    sizes = {}
    for ref in files:
        path = ref.local_path(comfyui_path)
        if path is not None and path.is_file():
            sizes[ref.filename] = path.stat().st_size
    _too_big(sum(sizes.values()), max_response_mb, sizes)


def _too_big(total: int, max_response_mb: float, sizes: dict) -> None:
    encoded_mb = total * 4 / 3 / (1024 * 1024)
    if encoded_mb > max_response_mb:
        raise JobError(
            f"The outputs are {encoded_mb:.1f} MB as base64, more than MAX_RESPONSE_MB ({max_response_mb:g} MB); "
            "configure S3 (BUCKET_ENDPOINT_URL and credentials) to receive them as URLs.",
            {"base64_mb": round(encoded_mb, 2), "max_response_mb": max_response_mb, "file_bytes": sizes},
        )


def cleanup(
    files: list[OutputFile],
    comfyui_path: ComfyFolders | Path,
    uploaded_inputs: list[str],
    created_after: float | None = None,
) -> None:
    """Delete this job's own output/temp files and uploaded inputs (never anything else).

    With ``created_after`` (a ``time.time()`` taken before the prompt was queued) an output or temp file
    is deleted only if its status changed since: a node that reports a file that was already there (an
    earlier job's, a user's) does not get it deleted.
    """
    folders = as_folders(comfyui_path)
    paths = []
    for ref in files:
        path = ref.local_path(folders) if ref.type in ("output", "temp") else None
        if path is None:
            continue
        if created_after is not None:
            try:
                if path.stat().st_ctime < created_after - CLOCK_SLACK_S:
                    log.info("Keeping %s: it existed before this job's prompt", path.name)
                    continue
            except OSError:
                continue
        paths.append(path)
    input_dir = folders.input.resolve()
    paths += [input_dir / name for name in uploaded_inputs]
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("Could not remove %s: %s", path, exc)
