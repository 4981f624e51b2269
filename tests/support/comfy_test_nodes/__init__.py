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


NODE_CLASS_MAPPINGS = {"WorkerTestSleep": WorkerTestSleep}
NODE_DISPLAY_NAME_MAPPINGS = {"WorkerTestSleep": "Worker Test Sleep"}
