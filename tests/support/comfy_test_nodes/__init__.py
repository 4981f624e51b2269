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


class WorkerTestWaitFile:
    """Passes an image through once the file ``path`` exists (or after ``max_seconds``): a job that
    runs exactly until the test ends it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "path": ("STRING", {"default": ""}),
                "max_seconds": ("FLOAT", {"default": 120.0, "min": 0.0, "max": 3600.0, "step": 0.1}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "comfy_worker_tests"

    def run(self, image, path, max_seconds):
        deadline = time.monotonic() + max_seconds
        while not os.path.exists(path) and time.monotonic() < deadline:
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


class WorkerTestBroadcast:
    """Passes an image through after broadcasting, to every connected client, websocket messages a
    misbehaving custom node might send: payloads of the wrong type, text that is not JSON, and
    well-formed job messages that name no prompt (or another one). ``report_file`` (a file in the
    output folder) is named in the stray ``executed`` messages."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}, "optional": {"report_file": ("STRING", {"default": "x.png"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "comfy_worker_tests"

    def run(self, image, report_file="x.png"):
        import asyncio

        from server import PromptServer

        server = PromptServer.instance
        stray = {"images": [{"filename": report_file, "subfolder": "", "type": "output"}]}
        for event, data in [
            ("x", "hello"),
            ("status", "hello"),
            ("status", {"status": "busy"}),
            ("executing", ["not", "an", "object"]),
            ("executed", "a string"),
            ("progress", None),
            ("execution_cached", {"nodes": 5}),
            ("executed", {"node": "2", "output": stray}),  # no prompt_id
            ("executed", {"node": "2", "output": stray, "prompt_id": "someone-else"}),
            ("execution_error", {"node_id": "2", "node_type": "SaveImage", "exception_message": "stray"}),
            ("execution_interrupted", {"node_id": "2", "node_type": "SaveImage"}),
            ("execution_success", {}),
            ("executing", {"node": None}),
        ]:
            server.send_sync(event, data)
        for ws in list(server.sockets.values()):  # raw text frames that are not JSON objects
            for text in ("not json {", "[1, 2]", '"just a string"', "null"):
                asyncio.run_coroutine_threadsafe(ws.send_str(text), server.loop).result(5)
        time.sleep(0.2)  # let the broadcasts reach the clients while this prompt is still running
        return (image,)


class WorkerTestReportFile:
    """An output node that reports ``filename`` (an existing file in the output folder) as its output,
    without writing it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename": ("STRING", {"default": "x.png"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_worker_tests"

    def run(self, filename):
        return {"ui": {"images": [{"filename": filename, "subfolder": "", "type": "output"}]}}


class WorkerTestFail:
    """An output node that fails with ``message`` (as a node that quotes a value in its error)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"message": ("STRING", {"default": "failed"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_worker_tests"

    def run(self, message):
        raise RuntimeError(message)


NODE_CLASS_MAPPINGS = {
    "WorkerTestSleep": WorkerTestSleep,
    "WorkerTestSteps": WorkerTestSteps,
    "WorkerTestApiKey": WorkerTestApiKey,
    "WorkerTestSaveAndPass": WorkerTestSaveAndPass,
    "WorkerTestBroadcast": WorkerTestBroadcast,
    "WorkerTestReportFile": WorkerTestReportFile,
    "WorkerTestFail": WorkerTestFail,
    "WorkerTestWaitFile": WorkerTestWaitFile,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorkerTestSleep": "Worker Test Sleep",
    "WorkerTestSteps": "Worker Test Steps",
    "WorkerTestApiKey": "Worker Test API Key",
    "WorkerTestSaveAndPass": "Worker Test Save And Pass",
    "WorkerTestBroadcast": "Worker Test Broadcast",
    "WorkerTestReportFile": "Worker Test Report File",
    "WorkerTestFail": "Worker Test Fail",
    "WorkerTestWaitFile": "Worker Test Wait File",
}
