"""A request queue in a folder: each request claimed by one worker, finished once, every step recorded.

Layout (one folder, on a file system every worker can reach)::

    queue/
      pending/<id>.json    requests waiting (job files, see provider.py; relative paths are read
                           from the queue folder)
      running/<id>.json    claimed by a worker; leases/<id>.json says by whom and until when
      done/<id>.json       finished; the results are in outputs/<id>/
      failed/<id>.json     given up; records/<id>.json says why
      records/<id>.json    the request's record: submission, every attempt, the outcome
      outputs/<id>/        LoRA, report, training data, preview and audit.json, published in one rename
      lines/<name>.json    a model line's requests in submission order (requests whose job names "line")

The state of a request is the folder its file is in. Every transition moves the file with one
``os.replace`` while holding the queue's lock (``fcntl.flock`` on ``queue/.lock``), checks first
that the caller still owns the request (its claim's token matches the lease), and then
rewrites the record atomically. So a request is claimed by one worker at a time and finished
(moved to done/) exactly once, whatever crashes in between:

- a worker that dies is reported with :meth:`RequestQueue.fail` (``retry=True``): the request
  goes back to pending/ until ``max_attempts`` starts have failed, then to failed/;
- a whole serve process that dies stops renewing its leases; :meth:`recover_expired` treats an
  expired lease as a failed attempt;
- a graceful shutdown hands back (:meth:`release`) what it cannot finish: back to pending/,
  not counted.

**A model line** (a job's ``"line": "<name>"``): a provider's requests that each train on the model
with every earlier request of the line applied (:mod:`unlearn_core.serve.earlier`). They are
claimed in submission order, one at a time: a request waits in pending/ until every earlier one of
its line is done (other requests are claimed meanwhile), and fails with the reason if an earlier
one failed. The worker names the earlier requests' results as the job's ``earlier``.

A request is a file: drop a job file into pending/ by hand, or :meth:`submit` it (``unlearn
queue``). Names must be safe file names (:func:`unlearn_core.formats.files.safe_name`); a file whose
name is not is moved to failed/ with the reason when it is found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError, UnlearnError
from ..formats.files import atomic_write_bytes, atomic_write_text, safe_name

__all__ = ["RequestQueue", "Claim", "LostClaim", "STATES"]

log = logging.getLogger(__name__)

STATES = ("pending", "running", "done", "failed")
FOLDERS = (*STATES, "leases", "records", "outputs", "lines")
#: attempt outcomes that count towards max_attempts (a released attempt does not)
FAILED_OUTCOMES = ("crashed", "error")


class LostClaim(UnlearnError):
    """The request is no longer this claim's (its lease expired and it went to another worker)."""


@dataclass
class Claim:
    """One worker's hold on one request: which request, which attempt, and the lease token."""

    id: str
    attempt: int
    token: str
    worker: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Claim:
        return cls(**values)


class RequestQueue:
    """The queue folder's state machine (no Ray here: any process on the shared folder can use it)."""

    def __init__(self, root: str | os.PathLike, max_attempts: int = 3, lease_seconds: float = 600.0,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise InputError(f"max_attempts={max_attempts!r} must be a whole number of at least 1")
        if not lease_seconds > 0:
            raise InputError(f"lease_seconds={lease_seconds!r} must be positive")
        self.root = Path(root).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"the queue folder {str(self.root)!r} is a file; give a folder")
        self.max_attempts = max_attempts
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------------

    def path(self, state: str, request_id: str) -> Path:
        return self.root / state / f"{request_id}.json"

    def outputs(self, request_id: str) -> Path:
        return self.root / "outputs" / request_id

    def staging(self, claim: Claim) -> Path:
        """Where one attempt writes its outputs before :meth:`publish` renames them into place."""
        return self.root / "outputs" / f".{claim.id}.{claim.token}.partial"

    def _lease_path(self, request_id: str) -> Path:
        return self.root / "leases" / f"{request_id}.json"

    def _record_path(self, request_id: str) -> Path:
        return self.root / "records" / f"{request_id}.json"

    def _line_path(self, line: str) -> Path:
        return self.root / "lines" / f"{safe_name(line, 'line name')}.json"

    def line_before(self, request_id: str) -> list[str]:
        """The requests submitted to ``request_id``'s model line before it, oldest first ([] outside a line)."""
        line = self.record(request_id).get("line")
        if line is None:
            return []
        members = json.loads(self._line_path(line).read_text("utf-8"))
        return members[: members.index(request_id)]

    def state(self, request_id: str) -> str | None:
        return next((state for state in STATES if self.path(state, request_id).exists()), None)

    # --- reading -------------------------------------------------------------------------------

    def ids(self, state: str) -> list[str]:
        """Request ids in a state, oldest file first (the order they are claimed in)."""
        entries = []
        for path in (self.root / state).iterdir():
            if path.name.startswith(".") or path.suffix != ".json" or not path.is_file():
                continue  # temporary files of atomic writes, and anything that is not a request
            with contextlib.suppress(FileNotFoundError):
                entries.append((path.stat().st_mtime_ns, path.stem))
        return [name for _, name in sorted(entries)]

    def record(self, request_id: str) -> dict:
        try:
            return json.loads(self._record_path(request_id).read_text("utf-8"))
        except FileNotFoundError:
            return {"id": request_id, "attempts": []}

    def lease(self, request_id: str) -> dict | None:
        try:
            return json.loads(self._lease_path(request_id).read_text("utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def status(self) -> dict[str, list[dict]]:
        """Every request by state, with its attempts, holder (running) or error (failed)."""
        report = {}
        for state in STATES:
            entries = []
            for request_id in self.ids(state):
                record = self.record(request_id)
                entry = {"id": request_id, "attempts": len(record.get("attempts", []))}
                if state == "running":
                    lease = self.lease(request_id) or {}
                    entry.update(worker=lease.get("worker"), expires_at=lease.get("expires_at"))
                if state == "failed":
                    entry["error"] = record.get("error")
                if state == "done":
                    entry["outputs"] = str(self.outputs(request_id))
                entries.append(entry)
            report[state] = entries
        return report

    def is_idle(self) -> bool:
        """Nothing pending and nothing running (here or in another serve on the same folder)."""
        return not self.ids("pending") and not self.ids("running")

    # --- transitions ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            raise InputError("the request queue needs POSIX file locks (Linux or macOS)") from None
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_record(self, request_id: str, record: dict) -> None:
        atomic_write_text(self._record_path(request_id), json.dumps(record, indent=2, sort_keys=True))

    def submit(self, request: dict | bytes, name: str) -> str:
        """Add a request (a job as a dict, or a job file's bytes) under the id ``name``."""
        request_id = safe_name(str(name).removesuffix(".json"), "request name")
        data = request if isinstance(request, bytes) else json.dumps(request, indent=2, sort_keys=True).encode()
        try:
            parsed = json.loads(data)
        except ValueError as error:
            raise InputError(f"request {request_id!r} is not readable JSON ({error}); fix the file") from None
        if not isinstance(parsed, dict):
            raise InputError(f"request {request_id!r} must hold one JSON object (a job: model, targets, config, output)")
        line = parsed.get("line")
        if line is not None and not isinstance(line, str):
            raise InputError(f"request {request_id!r}: line={line!r} must be the model line's name")
        with self._locked():
            for state in STATES:
                if self.path(state, request_id).exists():
                    raise InputError(f"a request named {request_id!r} is already {state}; give the new one another name")
            record = {"id": request_id, "submitted_at": self.clock(), "state": "pending",
                      "request_sha256": hashlib.sha256(data).hexdigest(), "attempts": []}  # fmt: skip
            if line is not None:  # its place in the line is fixed now, in submission order
                path = self._line_path(line)
                members = json.loads(path.read_text("utf-8")) if path.exists() else []
                atomic_write_text(path, json.dumps([*members, request_id]))
                record["line"] = line
            self._write_record(request_id, record)
            atomic_write_bytes(self.path("pending", request_id), data)
        return request_id

    def _line_blocker(self, request_id: str) -> tuple[str, str] | None:
        """The first earlier request of its line that is not done, with its state (lock held)."""
        for earlier in self.line_before(request_id):
            state = self.state(earlier)
            if state != "done":
                return earlier, state or "missing"
        return None

    def claim(self, worker: dict) -> Claim | None:
        """Take the oldest pending request for ``worker`` (host, pid, ...), or None if none waits."""
        with self._locked():
            for request_id in self.ids("pending"):
                source = self.path("pending", request_id)
                try:
                    safe_name(request_id, "request name")
                except InputError as error:
                    self._move(source, "failed", request_id)
                    record = self.record(request_id)
                    self._write_record(request_id, {**record, "id": request_id, "state": "failed", "error": str(error)})
                    log.error("request file %s refused: %s", source.name, error)
                    continue
                blocker = self._line_blocker(request_id)
                if blocker is not None and blocker[1] in ("failed", "missing"):  # the line cannot go on from there
                    record = self.record(request_id)
                    error = (f"model line {record['line']!r}: the earlier request {blocker[0]!r} is "
                             f"{blocker[1]}, so this one has no model to train on; resubmit the line from there")  # fmt: skip
                    self._move(source, "failed", request_id)
                    self._write_record(request_id, {**record, "state": "failed", "error": error})
                    log.error("request %s refused: %s", request_id, error)
                    continue
                if blocker is not None:  # waits for the earlier requests of its line
                    continue
                record = self.record(request_id)
                attempts = list(record.get("attempts", []))
                now = self.clock()
                claim = Claim(request_id, len(attempts) + 1, uuid.uuid4().hex, dict(worker))
                self._move(source, "running", request_id)
                lease = {"token": claim.token, "attempt": claim.attempt, "worker": claim.worker, "claimed_at": now,
                         "expires_at": now + self.lease_seconds}  # fmt: skip
                atomic_write_text(self._lease_path(request_id), json.dumps(lease, sort_keys=True))
                attempts.append({"attempt": claim.attempt, "worker": claim.worker, "claimed_at": now, "outcome": None})
                if "request_sha256" not in record:  # dropped into pending/ by hand
                    record["request_sha256"] = hashlib.sha256(self.path("running", request_id).read_bytes()).hexdigest()
                self._write_record(request_id, {**record, "id": request_id, "state": "running", "attempts": attempts})
                return claim
        return None

    def _move(self, source: Path, state: str, request_id: str) -> None:
        os.replace(source, self.path(state, request_id))

    def _own(self, claim: Claim) -> None:
        lease = self.lease(claim.id)
        if lease is None or lease.get("token") != claim.token or not self.path("running", claim.id).exists():
            raise LostClaim(f"request {claim.id!r} is no longer held by this worker (its lease expired or it was released)")

    def _finish_attempt(self, claim: Claim, state: str, outcome: str, error: str | None = None,
                        result: dict | None = None, reason: str | None = None) -> None:  # fmt: skip
        """Move the claimed request to ``state`` and close its attempt in the record (lock held)."""
        self._move(self.path("running", claim.id), state, claim.id)
        self._lease_path(claim.id).unlink(missing_ok=True)
        record = self.record(claim.id)
        attempts = record.get("attempts", [])
        for attempt in attempts:
            if attempt.get("attempt") == claim.attempt and attempt.get("outcome") is None:
                attempt.update({"outcome": outcome, "finished_at": self.clock()})
                attempt.update({key: value for key, value in (("error", error), ("reason", reason)) if value is not None})
        record.update(state=state, attempts=attempts)
        record.pop("error", None)
        if state == "failed":
            record["error"] = error
        if result is not None:
            record["result"] = result
        self._write_record(claim.id, record)

    def holds(self, claim: Claim) -> bool:
        """Whether the request is still this claim's (a read, no lock: a worker asks it while it trains)."""
        try:
            self._own(claim)
        except (LostClaim, OSError, ValueError):
            return False
        return True

    def renew(self, claim: Claim) -> bool:
        """Extend the lease; False when the request is no longer this claim's."""
        with self._locked():
            try:
                self._own(claim)
            except LostClaim:
                return False
            lease = {**self.lease(claim.id), "expires_at": self.clock() + self.lease_seconds}
            atomic_write_text(self._lease_path(claim.id), json.dumps(lease, sort_keys=True))
            return True

    def publish(self, claim: Claim, staging: Path) -> Path:
        """Rename an attempt's finished output folder to outputs/<id>/ (replacing an earlier attempt's)."""
        target = self.outputs(claim.id)
        with self._locked():
            self._own(claim)
            if target.exists():  # an attempt that published, then crashed before being marked done
                shutil.rmtree(target)
            os.replace(staging, target)
        return target

    def complete(self, claim: Claim, result: dict | None = None) -> None:
        """The request is done: running/ -> done/, the record keeps ``result``."""
        with self._locked():
            self._own(claim)
            self._finish_attempt(claim, "done", "done", result=result or {})

    def fail(self, claim: Claim, error: str, retry: bool) -> str:
        """An attempt failed. ``retry`` (a crash, not a bad request): back to pending while fewer
        than ``max_attempts`` starts have failed. Returns the request's new state."""
        with self._locked():
            self._own(claim)
            return self._fail_locked(claim, error, retry)

    def _fail_locked(self, claim: Claim, error: str, retry: bool) -> str:
        self._discard_staging(claim)
        failures = 1 + sum(a.get("outcome") in FAILED_OUTCOMES for a in self.record(claim.id).get("attempts", []))
        state = "pending" if retry and failures < self.max_attempts else "failed"
        if retry and state == "failed":
            error = f"{error} (failed {failures} of at most {self.max_attempts} attempts)"
        self._finish_attempt(claim, state, "crashed" if retry else "error", error=error)
        (log.warning if state == "pending" else log.error)("request %s attempt %d failed (now %s): %s", claim.id,
                                                           claim.attempt, state, error)  # fmt: skip
        return state

    def release(self, claim: Claim, reason: str = "released at shutdown") -> None:
        """Put a claimed request back to pending/ without counting the attempt (graceful shutdown)."""
        with self._locked():
            self._own(claim)
            self._discard_staging(claim)
            self._finish_attempt(claim, "pending", "released", reason=reason)

    def _discard_staging(self, claim: Claim) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.staging(claim))

    def recover_expired(self) -> list[str]:
        """Requests whose lease ran out (their serve process died): each counts as a crashed attempt."""
        recovered = []
        with self._locked():
            now = self.clock()
            for request_id in self.ids("running"):
                lease = self.lease(request_id)
                if lease is not None and lease.get("expires_at", 0) > now:
                    continue
                if lease is None:  # the claimant died between moving the file and writing the lease
                    open_attempts = [a for a in self.record(request_id).get("attempts", []) if a.get("outcome") is None]
                    lease = {"token": "", "attempt": open_attempts[-1]["attempt"] if open_attempts else 0, "worker": None}
                claim = Claim(request_id, lease.get("attempt", 0), lease.get("token", ""), lease.get("worker") or {})
                error = f"the lease of worker {lease.get('worker')} expired: its process stopped without finishing"
                self._fail_locked(claim, error, retry=True)
                recovered.append(request_id)
        return recovered
