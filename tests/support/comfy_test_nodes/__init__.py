"""Custom nodes used only by the tests (installed into the test ComfyUI's custom_nodes)."""

import os
import time


class WorkerTestSleep:
    """Passes an image through after sleeping ``seconds`` (a slow node for timeout tests)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3600.0, "step": 0.1}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "comfy_worker_tests"

    def run(self, image, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return (image,)


class WorkerTestSteps:
    """Passes an image through after ``steps`` short sleeps, reporting progress after each one (so
    ComfyUI sends ``progress`` messages and an interrupt lands within one step)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "steps": ("INT", {"default": 10, "min": 1, "max": 10000}),
                "seconds_per_step": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 60.0, "step": 0.01}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "comfy_worker_tests"

    def run(self, image, steps, seconds_per_step):
        import comfy.utils

        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(seconds_per_step)
            bar.update(1)
        return (image,)


class WorkerTestApiKey:
    """Shows the SHA-256 (first 16 hex digits) of the Comfy.org API key ComfyUI passed in, or "none"
    (the key itself is never shown)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {},
            "optional": {"fail": ("BOOLEAN", {"default": False})},
            "hidden": {"api_key": "API_KEY_COMFY_ORG"},
        }

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_worker_tests"

    def run(self, api_key=None, fail=False):
        import hashlib

        if fail:  # like an API node that echoes the rejected key in its error
            raise RuntimeError(f"the service rejected the API key {api_key}")
        text = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else "none"
        return {"ui": {"text": [text]}}


class WorkerTestSaveAndPass:
    """An output node whose output is also used downstream: after ``seconds`` (a sleep that ignores
    interrupts) it saves the first image as a PNG in the output folder, shows it, and passes the image on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image": ("IMAGE",), "filename_prefix": ("STRING", {"default": "save_and_pass"})},
            "optional": {"seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 600.0, "step": 0.01})},
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_worker_tests"

    def run(self, image, filename_prefix, seconds=0.0):
        import folder_paths
        import numpy as np
        from PIL import Image

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), image.shape[2], image.shape[1]
        )
        file = f"{name}_{counter:05}_.png"
        pixels = (image[0].cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, file))
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}]}, "result": (image,)}


NODE_CLASS_MAPPINGS = {
    "WorkerTestSleep": WorkerTestSleep,
    "WorkerTestSteps": WorkerTestSteps,
    "WorkerTestApiKey": WorkerTestApiKey,
    "WorkerTestSaveAndPass": WorkerTestSaveAndPass,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorkerTestSleep": "Worker Test Sleep",
    "WorkerTestSteps": "Worker Test Steps",
    "WorkerTestApiKey": "Worker Test API Key",
    "WorkerTestSaveAndPass": "Worker Test Save And Pass",
}
