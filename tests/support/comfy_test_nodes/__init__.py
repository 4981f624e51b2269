"""Custom nodes used only by the tests (installed into the test ComfyUI's custom_nodes)."""

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
        return {"required": {}, "hidden": {"api_key": "API_KEY_COMFY_ORG"}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "comfy_worker_tests"

    def run(self, api_key=None):
        import hashlib

        text = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else "none"
        return {"ui": {"text": [text]}}


NODE_CLASS_MAPPINGS = {
    "WorkerTestSleep": WorkerTestSleep,
    "WorkerTestSteps": WorkerTestSteps,
    "WorkerTestApiKey": WorkerTestApiKey,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorkerTestSleep": "Worker Test Sleep",
    "WorkerTestSteps": "Worker Test Steps",
    "WorkerTestApiKey": "Worker Test API Key",
}
