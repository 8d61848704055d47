"""What the user sees while a node runs: ComfyUI's progress bar, its cancel, websocket events to the
client, and the running server's route table."""

from __future__ import annotations

import comfy.model_management
import comfy.utils


def progress_bar(total: int, node_id: str | None):
    return comfy.utils.ProgressBar(total, node_id=node_id)


def raise_if_interrupted() -> None:
    """Raises ComfyUI's interrupt when the user cancelled the prompt."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _server():
    try:
        from server import PromptServer
    except ImportError:  # running without the server (scripts, some tests)
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """A websocket event to the client that queued the prompt (nothing without the server)."""
    instance = _server()
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


def server_routes():
    """The running server's aiohttp route table (None without the server)."""
    instance = _server()
    return None if instance is None else instance.routes
