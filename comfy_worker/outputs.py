"""Collect, deliver and clean up the outputs of one prompt (SPEC §7).

Every saved file of every node under any output key is delivered (``temp`` previews are skipped),
classified into ``images`` / ``files`` by content type, read from ComfyUI's output folder on disk
when it is there (``/view`` otherwise), and returned as base64 or S3 URLs. ``text`` outputs are
collected as they are.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from comfy_worker.comfy_client import ComfyClient
from comfy_worker.job_errors import JobError
from s3_upload import S3Uploader

log = logging.getLogger("outputs")

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
_FOLDERS = {"output": "output", "temp": "temp", "input": "input"}


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

    def local_path(self, comfyui_path: Path) -> Path | None:
        """The file inside ComfyUI's folder for its type, or None if that would leave the folder."""
        folder = _FOLDERS.get(self.type)
        if folder is None:
            return None
        base = (comfyui_path / folder).resolve()
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


async def _read(client: ComfyClient, comfyui_path: Path, ref: OutputFile) -> tuple[bytes | None, Path | None]:
    path = ref.local_path(comfyui_path)
    if path is not None and path.is_file():
        size = path.stat().st_size
        data = path.read_bytes() if size < 8 * 1024 * 1024 else await asyncio.to_thread(path.read_bytes)
        return data, path
    return await client.view(ref.filename, ref.subfolder, ref.type), None


async def _to_s3(client: ComfyClient, comfyui_path: Path, ref: OutputFile, s3: S3Uploader, job_id: str, name: str):
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
    comfyui_path: Path,
    job_id: str,
    s3: S3Uploader | None,
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


def _check_size(files: list[OutputFile], comfyui_path: Path, max_response_mb: float) -> None:
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


def cleanup(files: list[OutputFile], comfyui_path: Path, uploaded_inputs: list[str]) -> None:
    """Delete this job's own output/temp files and uploaded inputs (never anything else)."""
    paths = [p for f in files if f.type in ("output", "temp") and (p := f.local_path(comfyui_path))]
    input_dir = (comfyui_path / "input").resolve()
    paths += [input_dir / name for name in uploaded_inputs]
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("Could not remove %s: %s", path, exc)
