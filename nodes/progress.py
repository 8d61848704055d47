"""Training progress for ComfyUI: the progress bar, cancel, and live events for the web chart."""

from __future__ import annotations

import logging
import time

from .host.events import progress_bar, raise_if_interrupted, send_event

log = logging.getLogger(__name__)

EVENT = "unlearn.progress"


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
        self.bar = progress_bar(total, self.node_id)
        self.started = time.perf_counter()

    def start(self) -> None:
        self.started = time.perf_counter()  # the ETA measures training alone, not what came before it
        send_event(EVENT, {"node": self.node_id, "phase": self.phase, "step": 0, "total": self.total})

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        raise_if_interrupted()
        elapsed = time.perf_counter() - self.started
        eta = elapsed / step * (total - step) if step else None
        self.bar.update_absolute(step, total)
        payload = {"node": self.node_id, "phase": self.phase, "step": step, "total": total, "eta_s": eta}
        payload.update({k: metrics[k] for k in ("forget_loss", "remember_loss", "objective", "forgotten") if k in metrics})
        send_event(EVENT, payload)
        if step == total or step % max(1, total // 10) == 0:
            log.info("unlearn %s step %d/%d forget %.4g remember %.4g", self.phase, step, total,
                     metrics.get("forget_loss", float("nan")), metrics.get("remember_loss", float("nan")))  # fmt: skip

    def finish(self, status: str, **extra) -> None:
        if status == "done":  # verified stopping may end training before the bar's total
            self.bar.update_absolute(self.total, self.total)
        send_event(EVENT, {"node": self.node_id, "phase": self.phase, "status": status, **extra})
