"""One worker of the request queue: runs claimed requests one after another, model kept loaded.

A :class:`RequestWorker` lives as long as its process (a Ray actor in :mod:`unlearn_core.serve.cluster`,
one per GPU); its :class:`~unlearn_core.formats.model_folders.ModelCache` keeps the last base model, so
a fleet loads SD3.5 once per GPU instead of once per request. For each claim it runs the job
exactly as ``unlearn run`` does (:func:`unlearn_core.serve.provider.run_job`, same bytes for the same
seed, device and thread count), writes every output into a staging folder, adds the audit record
``audit.json``, and publishes the folder as ``outputs/<id>/`` in one rename.

It never moves the request between states: it returns what happened and the process that
claimed the request (the serve loop) records it, so a worker that dies mid-request leaves the
request for the serve loop to retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

import torch

from ..errors import InputError, UnlearnError
from ..formats.files import atomic_write_text, file_sha256
from ..formats.model_folders import ModelCache
from ..runtime import configure_torch
from .provider import output_file, run_job
from .request_queue import Claim, RequestQueue

__all__ = ["RequestWorker", "AUDIT_FILE"]

log = logging.getLogger(__name__)

#: the audit record in every request's output folder
AUDIT_FILE = "audit.json"


def _read_request(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    try:
        job = json.loads(data)
    except ValueError as error:
        raise InputError(f"the request is not readable JSON ({error}); fix the file and submit it again") from None
    if not isinstance(job, dict):
        raise InputError("the request must hold one JSON object (a job: model, targets, config, output)")
    return job, data


class LeaseCheck:
    """``should_stop`` for the trainer: true once the claim no longer holds its request, read at
    most every ``every`` seconds (the lease is a file)."""

    def __init__(self, queue: RequestQueue, claim: Claim, every: float = 5.0):
        self.queue, self.claim, self.every = queue, claim, every
        self.checked, self.lost = time.monotonic(), False

    def __call__(self) -> bool:
        if not self.lost and time.monotonic() - self.checked >= self.every:
            self.checked = time.monotonic()
            self.lost = not self.queue.holds(self.claim)
        return self.lost


class RequestWorker:
    """Runs queue requests in this process, keeping the last base model loaded between them."""

    def __init__(self, queue_root: str, device: str = "cpu", threads: int = 1, name: str = "worker"):
        configure_torch(threads)
        self.queue = RequestQueue(queue_root)
        self.device = device
        self.name = name
        self.models = ModelCache(device)
        self.lease_check_seconds = 5.0  # how often training asks whether its lease still holds

    def identity(self) -> dict:
        """Who this worker is, for leases and audit records."""
        identity = {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(), "device": self.device}
        if self.device.startswith("cuda"):
            identity["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
        return identity

    def run(self, claim: Claim | dict) -> dict:
        """Process one claimed request; returns ``{"status": "done", ...}`` or ``{"status":
        "failed", "error": ..., "retry": ...}`` (bad requests are not retried, other errors are)."""
        claim = Claim.from_dict(claim) if isinstance(claim, dict) else claim
        staging = self.queue.staging(claim)
        started = time.time()
        try:
            job, data = _read_request(self.queue.path("running", claim.id))
            job = self._on_its_line(claim.id, job)
            staging.mkdir(parents=True, exist_ok=False)
            # a request whose lease went to another worker stops training at the next check
            result = run_job(job, base_dir=self.queue.root, out_dir=staging, models=self.models,
                             should_stop=LeaseCheck(self.queue, claim, self.lease_check_seconds))
            audit = self._audit(claim, data, result, started, staging)
            atomic_write_text(staging / AUDIT_FILE, json.dumps(audit, indent=2, sort_keys=True))
            outputs = self.queue.publish(claim, staging)
        except UnlearnError as error:
            self._discard(staging)
            return {"status": "failed", "error": str(error), "retry": False}
        except Exception as error:  # anything else may be transient (out of memory, a lost file system): retry
            self._discard(staging)
            log.error("request %s: %s", claim.id, traceback.format_exc())
            return {"status": "failed", "error": f"{type(error).__name__}: {error}", "retry": True}
        files = {name: audit["outputs"][name] for name in sorted(audit["outputs"])}
        return {"status": "done", "outputs": str(outputs), "files": files, "model_loaded": result["model_loaded"],
                "worker": self.identity(), "seconds": time.time() - started}  # fmt: skip

    def _on_its_line(self, request_id: str, job: dict) -> dict:
        """A request of a model line as a job: the line's earlier results named as ``earlier``."""
        if "line" not in job:
            return job
        earlier = []
        for earlier_id in self.queue.line_before(request_id):
            earlier_job, _ = _read_request(self.queue.path("done", earlier_id))
            result = output_file(earlier_job, self.queue.outputs(earlier_id))
            earlier.append(result.relative_to(self.queue.root).as_posix())
        job = {key: value for key, value in job.items() if key != "line"}
        return {**job, "earlier": earlier} if earlier else job

    def _audit(self, claim: Claim, request: bytes, result: dict, started: float, staging: Path) -> dict:
        """What was asked, what ran where, on which inputs, and what came out (hashes of every file)."""
        record = self.queue.record(claim.id)
        outputs = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            outputs[path.relative_to(staging).as_posix()] = file_sha256(path)
        report = json.loads(Path(result["report"]).read_text("utf-8"))
        return {
            "request": {"id": claim.id, "sha256": hashlib.sha256(request).hexdigest(), "job": json.loads(request),
                        "submitted_at": record.get("submitted_at")},  # fmt: skip
            "attempt": {"number": claim.attempt, "worker": self.identity(), "started_at": started, "finished_at": time.time(),
                        "model_loaded_for_it": result["model_loaded"], "model_loads_by_worker": self.models.loads},  # fmt: skip
            "previous_attempts": [a for a in record.get("attempts", []) if a.get("attempt") != claim.attempt],
            "base_model": report["base_model"],
            # the model line: what it trained on (base + earlier results) and what serving it with this result is
            "model_state": report["model_state"],
            "result_state": report["result_state"],
            "line": record.get("line"),
            "earlier_requests": self.queue.line_before(claim.id),
            "targets_sha256": report["targets_sha256"],
            "training": {key: result[key] for key in ("adapter", "key_format", "steps", "seconds", "final_forget_loss",
                                                      "final_remember_loss", "samples")},  # fmt: skip
            "outputs": outputs,
        }

    @staticmethod
    def _discard(staging: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
