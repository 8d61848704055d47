"""``unlearn serve``: the request queue processed on Ray, one worker per GPU, models kept loaded.

:func:`serve` starts (or joins) a Ray cluster, starts one :class:`~unlearn_core.serve.request_worker.
RequestWorker` actor per GPU (or per ``cpus_per_worker`` CPUs when there are none), and loops:
claim a pending request for each idle worker, renew the leases of running ones, and record each
outcome in the queue (:mod:`unlearn_core.serve.request_queue`). A worker that dies (process killed,
node lost, out of memory) is replaced; its request goes back to pending/ and another worker
retries it, at most ``max_attempts`` starts in all. A bad request fails alone with its error.

Shutdown (:class:`Shutdown`, SIGINT/SIGTERM in the CLI): the first request stops claiming and
lets running requests finish for up to ``grace_seconds``; the second (or the end of the grace)
stops the workers and releases their requests to pending/, uncounted, for the next serve.

Ray is optional (``pip install 'instance-unlearn[cluster]'``) and imported only here, when
serving starts.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, fields

from ..errors import InputError, UnlearnError
from .request_queue import Claim, LostClaim, RequestQueue
from .request_worker import RequestWorker

__all__ = ["ServeSettings", "Shutdown", "serve", "require_ray", "ClusterUnavailable"]

log = logging.getLogger(__name__)


class ClusterUnavailable(UnlearnError):
    """Ray is not installed, or the cluster cannot host a worker; the message says what to do."""


def require_ray():
    """The ``ray`` module, or a :class:`ClusterUnavailable` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterUnavailable(
            "unlearn serve runs on Ray, which is not installed: pip install 'instance-unlearn[cluster]' "
            "(or pip install ray) in this environment and on every node"
        ) from None
    return ray


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ServeSettings:
    workers: int | None = _help("worker actors; None: one per GPU of the cluster (or per cpus_per_worker CPUs "
                                "without GPUs)", default=None)  # fmt: skip
    address: str | None = _help("Ray cluster to join ('auto' for the one `ray start` runs here, or HEAD:6379); "
                                "None starts a local one", default=None)  # fmt: skip
    gpus_per_worker: float | None = _help("GPUs each worker holds; None: 1 if the cluster has GPUs, else 0", default=None)
    cpus_per_worker: int = _help("CPUs each worker holds (and its torch threads)", default=1)
    local_cpus: int | None = _help("CPUs of a local cluster (address None); None: all of this machine", default=None)
    max_attempts: int = _help("starts of a request before it is marked failed (crashes count, releases do not)",
                              default=3)  # fmt: skip
    lease_seconds: float = _help("how long a claim holds without renewal; renewed every third of it while running",
                                 default=600.0)  # fmt: skip
    grace_seconds: float = _help("after a shutdown request, how long running requests may take to finish before "
                                 "they are released to pending", default=600.0)  # fmt: skip
    until_empty: bool = _help("stop when nothing is pending or running (else wait for new requests)", default=False)
    poll_seconds: float = _help("how often to look for new requests and finished workers", default=0.5)
    start_timeout: float = _help("seconds to wait for a worker to start before giving up (a cluster without room "
                                 "for it)", default=300.0)  # fmt: skip

    def __post_init__(self):
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise InputError(f"workers={self.workers!r} must be a whole number of at least 1 (or None: one per GPU)")
        if self.gpus_per_worker is not None and not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise InputError(f"gpus_per_worker={self.gpus_per_worker!r} must be 0 or more")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, int) or self.cpus_per_worker < 1:
            raise InputError(f"cpus_per_worker={self.cpus_per_worker!r} must be a whole number of at least 1")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InputError(f"max_attempts={self.max_attempts!r} must be a whole number of at least 1")
        for name in ("lease_seconds", "poll_seconds", "start_timeout"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise InputError(f"{name}={getattr(self, name)!r} must be a positive number of seconds")
        if not (math.isfinite(self.grace_seconds) and self.grace_seconds >= 0):
            raise InputError(f"grace_seconds={self.grace_seconds!r} must be 0 or more seconds")
        if self.lease_seconds < 3 * self.poll_seconds:
            raise InputError(f"lease_seconds={self.lease_seconds} must be at least three poll intervals "
                             f"({3 * self.poll_seconds} s), or leases lapse between renewals")  # fmt: skip

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


class Shutdown:
    """Asked once: finish running requests, claim no more. Asked twice: release them now."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()

    def request(self) -> None:
        with self._lock:
            self._count += 1
        log.warning("shutdown requested: %s", "finishing running requests (ask again to release them now)"
                    if self._count == 1 else "releasing running requests")  # fmt: skip

    @property
    def finishing(self) -> bool:
        return self._count >= 1

    @property
    def releasing(self) -> bool:
        return self._count >= 2


@dataclass
class _Slot:
    """One worker actor and what the lease and audit records call it."""

    name: str
    actor: object
    identity: dict


class _Pool:
    def __init__(self, ray, queue: RequestQueue, settings: ServeSettings):
        self.ray, self.queue, self.settings = ray, queue, settings
        resources = ray.cluster_resources()
        gpus = settings.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        self.gpus = gpus
        if settings.workers is not None:
            self.size = settings.workers
        elif gpus > 0:
            self.size = int(resources.get("GPU", 0) // gpus)
        else:
            self.size = int(resources.get("CPU", 1) // settings.cpus_per_worker)
        if self.size < 1:
            raise ClusterUnavailable(f"the cluster ({resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs) has no "
                                     f"room for one worker of {settings.cpus_per_worker} CPUs and {gpus} GPUs")  # fmt: skip
        self.actor_class = ray.remote(RequestWorker)
        self.started = 0

    def start(self, count: int) -> list[_Slot]:
        """Start ``count`` workers and wait until each has imported torch and answers."""
        pending = []
        for _ in range(count):
            self.started += 1
            name = f"worker-{self.started}"
            actor = self.actor_class.options(num_cpus=self.settings.cpus_per_worker, num_gpus=self.gpus, max_restarts=0,
                                             max_task_retries=0).remote(str(self.queue.root), "cuda" if self.gpus > 0 else "cpu",
                                                                        self.settings.cpus_per_worker, name)  # fmt: skip
            pending.append((name, actor, actor.identity.remote()))
        slots = []
        for name, actor, identity in pending:
            try:
                slots.append(_Slot(name, actor, self.ray.get(identity, timeout=self.settings.start_timeout)))
            except self.ray.exceptions.GetTimeoutError:
                raise ClusterUnavailable(f"{name} did not start within {self.settings.start_timeout:.0f} s: the cluster "
                                         "lacks free CPUs/GPUs for it (see `ray status`)") from None  # fmt: skip
        for slot in slots:
            log.info("%s ready: %s", slot.name, slot.identity)
        return slots

    def stop(self, slot: _Slot) -> None:
        self.ray.kill(slot.actor, no_restart=True)


def serve(root, settings: ServeSettings | None = None, shutdown: Shutdown | None = None, handle_signals: bool = False) -> dict:
    """Process the queue at ``root`` until shut down (or, with ``until_empty``, until idle).

    ``handle_signals`` (the CLI; main thread only): SIGINT and SIGTERM ask ``shutdown``, set
    after Ray starts, whose driver installs handlers of its own. Returns counts: done, failed,
    retried (attempts that crashed and went back to pending), released (running at shutdown and
    put back), workers started.
    """
    settings = settings or ServeSettings()
    shutdown = shutdown or Shutdown()
    ray = require_ray()
    queue = RequestQueue(root, settings.max_attempts, settings.lease_seconds)
    _plain_worker_prefixes()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=settings.address, num_cpus=settings.local_cpus if settings.address is None else None,
                 include_dashboard=False, logging_level=logging.WARNING)  # fmt: skip
    previous = _install_signals(shutdown) if handle_signals else {}
    counts = {"done": 0, "failed": 0, "retried": 0, "released": 0, "workers_started": 0}
    pool = None
    running: dict = {}  # ray ObjectRef -> (slot, claim)
    idle: list[_Slot] = []
    try:
        pool = _Pool(ray, queue, settings)
        for request_id in queue.recover_expired():
            log.warning("request %s: its last serve stopped without finishing it; retrying", request_id)
        idle = pool.start(pool.size)
        renewed = time.monotonic()
        shutdown_since = None
        while True:
            if shutdown.finishing and shutdown_since is None:
                shutdown_since = time.monotonic()
                log.warning("claiming no more requests; %d running", len(running))
            if shutdown_since is None:
                _dispatch(queue, idle, running)
            if time.monotonic() - renewed > settings.lease_seconds / 3:
                for _, claim in list(running.values()):
                    if not queue.renew(claim):
                        log.error("request %s: lease lost (another serve took it over)", claim.id)
                for request_id in queue.recover_expired():  # another serve on this folder died
                    log.warning("request %s: its serve stopped renewing the lease; retrying", request_id)
                renewed = time.monotonic()
            if not running:
                if shutdown_since is not None or (settings.until_empty and queue.is_idle()):
                    break
                time.sleep(settings.poll_seconds)
                continue
            if shutdown_since is not None and (shutdown.releasing or time.monotonic() - shutdown_since > settings.grace_seconds):
                for slot, claim in running.values():
                    pool.stop(slot)
                    queue.release(claim)
                    counts["released"] += 1
                running.clear()
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=settings.poll_seconds)
            for ref in ready:
                slot, claim = running.pop(ref)
                outcome = _outcome(ray, ref, slot)
                if not outcome.get("died"):
                    idle.append(slot)
                elif shutdown_since is None:
                    idle.extend(pool.start(1))  # a fresh worker in the dead one's place
                _record(queue, claim, outcome, counts)
    finally:
        if pool is not None:
            for slot in idle + [slot for slot, _ in running.values()]:
                pool.stop(slot)
            counts["workers_started"] = pool.started
        for _, claim in running.values():  # an error in this loop: hand the running requests back
            try:
                queue.release(claim, "the serve loop stopped")
                counts["released"] += 1
            except LostClaim:
                pass
        if started_ray:
            ray.shutdown()
        for number, handler in previous.items():
            signal.signal(number, handler)
    return counts


def _plain_worker_prefixes() -> None:
    """Ray prints each line a worker logs with a "(RequestWorker pid=...)" prefix in ANSI colour;
    in a log file those codes are noise. RAY_COLOR_PREFIX=0, which Ray's printer in this driver
    reads per line, leaves them out unless both streams are terminals. A value the user set wins.
    Set for the rest of the process: lines still arrive after serve returns (at Ray's exit)."""
    if "RAY_COLOR_PREFIX" not in os.environ and not all(_is_terminal(s) for s in (sys.stdout, sys.stderr)):
        os.environ["RAY_COLOR_PREFIX"] = "0"


def _is_terminal(stream) -> bool:
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


def _install_signals(shutdown: Shutdown) -> dict:
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, lambda *_: shutdown.request())
    return previous


def _dispatch(queue: RequestQueue, idle: list[_Slot], running: dict) -> None:
    """Claim one pending request for each idle worker and start it there."""
    while idle:
        claim = queue.claim(idle[-1].identity)
        if claim is None:
            return
        slot = idle.pop()
        running[slot.actor.run.remote(claim.to_dict())] = (slot, claim)
        log.info("request %s (attempt %d) -> %s", claim.id, claim.attempt, slot.name)


def _outcome(ray, ref, slot: _Slot) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as error:  # the worker process died (killed, out of memory, node lost)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {"status": "failed", "retry": True, "died": True,
                "error": f"{slot.name} (pid {slot.identity.get('pid')} on {slot.identity.get('host')}) died while running "
                         f"the request: {first_line}"}  # fmt: skip
    except ray.exceptions.RayError as error:
        return {"status": "failed", "retry": True, "error": f"{type(error).__name__}: {error}"}


def _record(queue: RequestQueue, claim: Claim, outcome: dict, counts: dict) -> None:
    try:
        if outcome["status"] == "done":
            queue.complete(claim, {key: outcome[key] for key in ("outputs", "files", "model_loaded", "worker", "seconds")})
            counts["done"] += 1
            log.info("request %s done", claim.id)
            return
        state = queue.fail(claim, outcome["error"], retry=outcome["retry"])
        counts["retried" if state == "pending" else "failed"] += 1
    except LostClaim as error:
        log.error("%s", error)
