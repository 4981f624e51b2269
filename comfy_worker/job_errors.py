"""The one error type of the handler: a readable sentence plus structured details (docs/api.md, "Errors")."""

from __future__ import annotations


class JobError(Exception):
    """A job failure: ``message`` is one readable sentence, ``details`` what a program needs to act on it.

    ``refresh_worker`` asks RunPod to replace this worker after the job (e.g. ComfyUI crashed).
    """

    def __init__(self, message: str, details: dict | None = None, refresh_worker: bool = False):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.refresh_worker = refresh_worker

    def to_output(self) -> dict:
        out: dict = {"error": self.message, "details": self.details}
        if self.refresh_worker:
            out["refresh_worker"] = True
        return out
