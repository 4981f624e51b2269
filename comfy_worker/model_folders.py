"""Which models folder each core ComfyUI loader reads, and where else a file of a given name lies.

ComfyUI names its model folders in ``folder_paths.py``; a folder name can cover several directories
under ``models/`` (``text_encoders`` reads ``models/text_encoders`` and ``models/clip``,
``diffusion_models`` reads ``models/unet`` and ``models/diffusion_models``, ``controlnet`` also reads
``models/t2i_adapter``) and ComfyUI maps the legacy names ``unet`` and ``clip`` onto the new ones.

``LOADERS`` is the table of core loader nodes (ComfyUI v0.3.75): for each class, its widgets in the
order the UI format stores their values, and which of its inputs name a file in which folder.
tests/test_model_folders.py checks the table against the live ``/object_info`` of a real ComfyUI
(a probe file in every folder shows which input lists which folder), so it cannot drift silently.

Used by check_workflow.py (is a workflow's model provided by config.yml, in the right folder?) and
by the handler's error for a model file ComfyUI does not list (``describe_missing_model``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# ComfyUI's folder_paths.map_legacy: old folder names that now mean another folder
ALIASES: dict[str, str] = {"unet": "diffusion_models", "clip": "text_encoders"}

# folder name -> the directories under models/ it reads, in ComfyUI's order (folder_paths.py)
FOLDER_DIRS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "configs": ("configs",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings",),
    "diffusers": ("diffusers",),
    "vae_approx": ("vae_approx",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "gligen": ("gligen",),
    "upscale_models": ("upscale_models",),
    "latent_upscale_models": ("latent_upscale_models",),
    "hypernetworks": ("hypernetworks",),
    "photomaker": ("photomaker",),
    "classifiers": ("classifiers",),
    "model_patches": ("model_patches",),
    "audio_encoders": ("audio_encoders",),
}

# what ComfyUI lists as model files (folder_paths.supported_pt_extensions)
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")

# How far describe_missing_model looks for a file of the same name (models/ can hold huge trees).
_MAX_FILES_SCANNED = 50_000


@dataclass(frozen=True)
class Loader:
    """A core loader node: its widgets in UI-format order, and the inputs that name a model file."""

    widgets: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)  # input name -> folder name


_CLIP_TYPES = ("type", "device")

LOADERS: dict[str, Loader] = {
    "CheckpointLoaderSimple": Loader(("ckpt_name",), {"ckpt_name": "checkpoints"}),
    "CheckpointLoader": Loader(("config_name", "ckpt_name"), {"config_name": "configs", "ckpt_name": "checkpoints"}),
    "unCLIPCheckpointLoader": Loader(("ckpt_name",), {"ckpt_name": "checkpoints"}),
    "ImageOnlyCheckpointLoader": Loader(("ckpt_name",), {"ckpt_name": "checkpoints"}),
    "UNETLoader": Loader(("unet_name", "weight_dtype"), {"unet_name": "diffusion_models"}),
    "VAELoader": Loader(("vae_name",), {"vae_name": "vae"}),
    "CLIPLoader": Loader(("clip_name", *_CLIP_TYPES), {"clip_name": "text_encoders"}),
    "DualCLIPLoader": Loader(
        ("clip_name1", "clip_name2", *_CLIP_TYPES), {f"clip_name{i}": "text_encoders" for i in (1, 2)}
    ),
    "TripleCLIPLoader": Loader(
        ("clip_name1", "clip_name2", "clip_name3"), {f"clip_name{i}": "text_encoders" for i in (1, 2, 3)}
    ),
    "QuadrupleCLIPLoader": Loader(
        ("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
        {f"clip_name{i}": "text_encoders" for i in (1, 2, 3, 4)},
    ),
    "LoraLoader": Loader(("lora_name", "strength_model", "strength_clip"), {"lora_name": "loras"}),
    "LoraLoaderModelOnly": Loader(("lora_name", "strength_model"), {"lora_name": "loras"}),
    "CreateHookLora": Loader(("lora_name", "strength_model", "strength_clip"), {"lora_name": "loras"}),
    "CreateHookLoraModelOnly": Loader(("lora_name", "strength_model"), {"lora_name": "loras"}),
    "CreateHookModelAsLora": Loader(("ckpt_name", "strength_model", "strength_clip"), {"ckpt_name": "checkpoints"}),
    "CreateHookModelAsLoraModelOnly": Loader(("ckpt_name", "strength_model"), {"ckpt_name": "checkpoints"}),
    "ControlNetLoader": Loader(("control_net_name",), {"control_net_name": "controlnet"}),
    "DiffControlNetLoader": Loader(("control_net_name",), {"control_net_name": "controlnet"}),
    "CLIPVisionLoader": Loader(("clip_name",), {"clip_name": "clip_vision"}),
    "StyleModelLoader": Loader(("style_model_name",), {"style_model_name": "style_models"}),
    "GLIGENLoader": Loader(("gligen_name",), {"gligen_name": "gligen"}),
    "UpscaleModelLoader": Loader(("model_name",), {"model_name": "upscale_models"}),
    "LatentUpscaleModelLoader": Loader(("model_name",), {"model_name": "latent_upscale_models"}),
    "HypernetworkLoader": Loader(("hypernetwork_name", "strength"), {"hypernetwork_name": "hypernetworks"}),
    "PhotoMakerLoader": Loader(("photomaker_model_name",), {"photomaker_model_name": "photomaker"}),
    "ModelPatchLoader": Loader(("name",), {"name": "model_patches"}),
    "AudioEncoderLoader": Loader(("audio_encoder_name",), {"audio_encoder_name": "audio_encoders"}),
    "TrainLoraNode": Loader(
        (
            "batch_size",
            "grad_accumulation_steps",
            "steps",
            "learning_rate",
            "rank",
            "optimizer",
            "loss_function",
            "seed",
            "training_dtype",
            "lora_dtype",
            "algorithm",
            "gradient_checkpointing",
            "existing_lora",
        ),
        {"existing_lora": "loras"},
    ),
}


# Popular node packs' loaders, read from their sources: the folder a model input reads, for when
# neither a live ComfyUI nor model-list.json knows the file (not ComfyUI's own: LOADERS is that).
PACK_LOADERS: dict[str, Loader] = {
    "ADE_AnimateDiffLoaderGen1": Loader(("model_name", "beta_schedule"), {"model_name": "animatediff_models"}),
    "ADE_LoadAnimateDiffModel": Loader(("model_name",), {"model_name": "animatediff_models"}),
    "ADE_AnimateDiffLoRALoader": Loader(("name", "strength"), {"name": "animatediff_motion_lora"}),
    "ControlNetLoaderAdvanced": Loader(("control_net_name",), {"control_net_name": "controlnet"}),
    "ACN_ControlNetLoaderAdvanced": Loader(("cnet",), {"cnet": "controlnet"}),
    "ACN_DiffControlNetLoaderAdvanced": Loader(("cnet",), {"cnet": "controlnet"}),
    "ACN_AnimaLLLiteLoaderAdvanced": Loader(("model_patch",), {"model_patch": "model_patches"}),
    "SAMLoader": Loader(("model_name", "device_mode"), {"model_name": "sams"}),
    "UltralyticsDetectorProvider": Loader(("model_name",), {"model_name": "ultralytics"}),  # "bbox/x.pt"
    "IPAdapterModelLoader": Loader(("ipadapter_file",), {"ipadapter_file": "ipadapter"}),
    "UnetLoaderGGUF": Loader(("unet_name",), {"unet_name": "diffusion_models"}),
    "CLIPLoaderGGUF": Loader(("clip_name", "type"), {"clip_name": "text_encoders"}),
    "DualCLIPLoaderGGUF": Loader(
        ("clip_name1", "clip_name2", "type"), {"clip_name1": "text_encoders", "clip_name2": "text_encoders"}
    ),
}
# What a value of any input may be to count as a model file (a custom loader's input, by extension).
MODEL_FILE_EXTENSIONS = (*MODEL_EXTENSIONS, ".gguf", ".onnx")
# model-list.json's "save_path": "default" means the folder of the entry's type.
MODEL_LIST_TYPE_FOLDERS = {
    "checkpoint": "checkpoints",
    "checkpoints": "checkpoints",
    "lora": "loras",
    "vae": "vae",
    "taesd": "vae_approx",
    "upscale": "upscale_models",
    "controlnet": "controlnet",
    "t2i-adapter": "controlnet",
    "clip": "text_encoders",
    "text_encoders": "text_encoders",
    "clip_vision": "clip_vision",
    "unet": "diffusion_models",
    "diffusion_model": "diffusion_models",
    "embeddings": "embeddings",
    "gligen": "gligen",
}


def looks_like_model_file(value: object) -> bool:
    """A widget or input value that names a model file (by its extension), whatever the node."""
    return isinstance(value, str) and "\n" not in value and value.strip().lower().endswith(MODEL_FILE_EXTENSIONS)


def model_list_folder(entry: dict) -> str | None:
    """The models folder of a model-list.json entry: its save_path's first part, or its type's."""
    save_path = str(entry.get("save_path") or "").strip().strip("/")
    if save_path and save_path != "default":
        return canonical(save_path)
    return MODEL_LIST_TYPE_FOLDERS.get(str(entry.get("type") or "").lower())


def canonical(folder: str) -> str:
    """The folder name ComfyUI uses for ``folder`` (``unet`` -> ``diffusion_models``, ``clip`` ->
    ``text_encoders``); a nested destination (``loras/wan``) is named by its first part."""
    top = folder.replace("\\", "/").strip("/").split("/", 1)[0]
    return ALIASES.get(top, top)


def dirs_read(folder: str) -> tuple[str, ...]:
    """The directories under models/ that ComfyUI reads for ``folder`` (an alias counts as its folder)."""
    name = canonical(folder)
    return FOLDER_DIRS.get(name, (name,))


def same_folder(a: str, b: str) -> bool:
    """True when ComfyUI reads both names as one folder (``unet`` and ``diffusion_models``)."""
    return canonical(a) == canonical(b)


def loader_folder(class_type: str, input_name: str) -> str | None:
    """The folder a core loader's input names a file in, or None (not a known loader input)."""
    loader = LOADERS.get(class_type)
    return loader.files.get(input_name) if loader else None


def is_model_file(folder: str, value: str) -> bool:
    """Whether ComfyUI would list ``value`` as a file of ``folder`` (by its extension): loaders also offer
    built-in choices that are no file (VAELoader's ``pixel_space`` and ``taesd``, ``[None]``)."""
    name = canonical(folder)
    if name in ("classifiers", "diffusers"):
        return True
    extensions = (".yaml",) if name == "configs" else MODEL_EXTENSIONS
    return value.lower().endswith(extensions)


def shown_dirs(folder: str) -> str:
    """``models/text_encoders (or models/clip)``: the directories a folder reads, for a message."""
    name = canonical(folder)
    dirs = [f"models/{d}" for d in sorted(dirs_read(folder), key=lambda d: d != name)]
    return dirs[0] + (f" (or {' or '.join(dirs[1:])})" if len(dirs) > 1 else "")


def widget_names(node_info: dict) -> list[str]:
    """The widgets of a node as ComfyUI's UI format stores their values (``widgets_values``), from the
    node's ``/object_info`` entry: its combo, number, text and boolean inputs in ``input_order``, with
    the ``control_after_generate`` value after each input that has one."""
    inputs = node_info.get("input") or {}
    order = node_info.get("input_order") or {s: list((inputs.get(s) or {}).keys()) for s in ("required", "optional")}
    names: list[str] = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        for name in order.get(section) or []:
            spec = specs.get(name)
            if not isinstance(spec, list) or not spec:
                continue
            kind = spec[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if options.get("control_after_generate"):
                    names.append("control_after_generate")
    return names


def files_named(models_dir: Path, name: str) -> list[str]:
    """Paths (relative to ``models_dir``, with ``/``) of every file called ``name``'s base name under
    ``models_dir``, sorted; the walk follows symlinks like ComfyUI and stops after a bounded count."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    found: list[str] = []
    seen = 0
    for dirpath, dirnames, filenames in os.walk(models_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for file_name in filenames:
            seen += 1
            if file_name == base:
                found.append(Path(dirpath, file_name).relative_to(models_dir).as_posix())
        if seen > _MAX_FILES_SCANNED:
            log.warning("Stopped looking for %r after %d files under %s", base, seen, models_dir)
            break
    return sorted(found)


def describe_missing_model(
    class_type: str, input_name: str, value: object, comfyui_path: str | Path, offered: list | None = None
) -> str | None:
    """A sentence to add to ComfyUI's "value not in list" error for a model file: which folder the
    loader reads and, when a file of that name lies in another models folder, where it is; for a
    Windows-style path (``wan\\x.safetensors``) the ``/`` form to write instead. None when the input is
    not a known loader's and no file of that name exists under models/. ``offered``: the values
    ComfyUI listed for the input."""
    if not isinstance(value, str) or not value.strip():
        return None
    if "\\" in value:
        return _describe_backslash(class_type, input_name, value, comfyui_path, offered or [])
    models_dir = Path(comfyui_path) / "models"
    folder = loader_folder(class_type, input_name)
    try:
        found = files_named(models_dir, value) if models_dir.is_dir() else []
    except OSError as err:  # an unreadable models folder must not hide the original error
        log.debug("Cannot search %s: %s", models_dir, err)
        found = []
    if folder is None:
        if not found:
            return None
        return f"a file of that name is in {', '.join(f'models/{p}' for p in found)}"
    reads = f"{class_type} reads {shown_dirs(folder)}"
    wanted = value.replace("\\", "/")
    dirs = dirs_read(folder)
    in_place = [p for p in found if p.split("/", 1)[0] in dirs and p.split("/", 1)[1] == wanted]
    elsewhere = [p for p in found if p not in in_place]
    if elsewhere:
        places = ", ".join(f"models/{p}" for p in elsewhere)
        return (
            f"{reads}; a file of that name is in {places}: move it, or set `destination: {folder}` for it in config.yml"
        )
    if in_place:
        return f"{reads}; models/{in_place[0]} exists but ComfyUI did not list it (not a model file type?)"
    return f"{reads}; no file named {wanted.rsplit('/', 1)[-1]!r} is under models/"


def _describe_backslash(class_type: str, input_name: str, value: str, comfyui_path, offered: list) -> str:
    """ComfyUI on Linux names files in subfolders with '/': say which value to write instead, and
    whether ComfyUI offers it or where the file is missing."""
    fixed = value.replace("\\", "/")
    sentence = f"model paths use '/', not '\\' (a workflow saved on Windows): write {fixed!r} instead of {value!r}"
    if fixed in offered:
        return f"{sentence}; ComfyUI offers {fixed!r}"
    rest = describe_missing_model(class_type, input_name, fixed, comfyui_path)
    return f"{sentence}; {rest}" if rest else sentence
