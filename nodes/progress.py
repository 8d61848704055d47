"""Training progress for ComfyUI: the progress bar, cancel, and live events for the web chart."""

from __future__ import annotations

import logging
import time

import comfy.model_management
import comfy.utils

log = logging.getLogger(__name__)

EVENT = "unlearn.progress"


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # running without the server (scripts, some tests)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


class TrainingProgress:
    """``callback(step, total, metrics)`` for the core trainer.

    Updates the node's progress bar, raises ComfyUI's interrupt when the user cancels (the
    trainer's cleanup then runs as for any exception), and emits ``unlearn.progress`` events
    with the losses and an ETA for the loss chart.
    """

    def __init__(self, node_id: str | None, total: int, phase: str = "train"):
        self.node_id = None if node_id is None else str(node_id)
        self.total = total
        self.phase = phase
        self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.started = time.perf_counter()

    def start(self) -> None:
        _send(EVENT, {"node": self.node_id, "phase": self.phase, "step": 0, "total": self.total})

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        elapsed = time.perf_counter() - self.started
        eta = elapsed / step * (total - step) if step else None
        self.bar.update_absolute(step, total)
        payload = {"node": self.node_id, "phase": self.phase, "step": step, "total": total, "eta_s": eta}
        payload.update({k: metrics[k] for k in ("forget_loss", "remember_loss", "objective") if k in metrics})
        _send(EVENT, payload)
        if step == total or step % max(1, total // 10) == 0:
            log.info("unlearn %s step %d/%d forget %.4g remember %.4g", self.phase, step, total,
                     metrics.get("forget_loss", float("nan")), metrics.get("remember_loss", float("nan")))  # fmt: skip

    def finish(self, status: str, **extra) -> None:
        _send(EVENT, {"node": self.node_id, "phase": self.phase, "status": status, **extra})
