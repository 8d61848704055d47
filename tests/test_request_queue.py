"""The queue folder's state machine and one worker, without Ray: claims are exclusive, every
request ends done or failed once, crashes retry at most max_attempts times, outputs appear whole."""

import json
import multiprocessing
import os

import pytest
from conftest import make_tiny_sd3, quick_job, save_targets, sd3_cond

from unlearn_core import InputError
from unlearn_core.cli import main
from unlearn_core.serve.provider import run_job
from unlearn_core.serve.request_queue import LostClaim, RequestQueue
from unlearn_core.serve.request_worker import AUDIT_FILE, RequestWorker

WORKER = {"host": "test", "pid": 1}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_submit_claim_complete_and_status(tmp_path):
    queue = RequestQueue(tmp_path / "q")
    for name in ("b", "a", "c"):
        queue.submit({"model": {}}, name)
    with pytest.raises(InputError, match="already pending"):
        queue.submit({"model": {}}, "a")
    first = queue.claim(WORKER)
    assert first.id == "b" and first.attempt == 1  # oldest first, not alphabetical
    queue.complete(first, {"outputs": "x"})
    with pytest.raises(LostClaim):
        queue.complete(first)  # done once
    status = queue.status()
    assert [e["id"] for e in status["pending"]] == ["a", "c"] and [e["id"] for e in status["done"]] == ["b"]
    record = queue.record("b")
    assert record["state"] == "done" and record["attempts"][0]["outcome"] == "done" and record["result"] == {"outputs": "x"}
    assert len(record["request_sha256"]) == 64


@pytest.mark.parametrize("name", ["../escape", "a/b", "con", ".hidden", ""])
def test_request_names_cannot_escape_or_hide(tmp_path, name):
    queue = RequestQueue(tmp_path / "q")
    with pytest.raises(InputError, match="request name"):
        queue.submit({}, name)
    assert not list((tmp_path / "q" / "pending").iterdir()) and not (tmp_path / "escape.json").exists()


def test_a_hand_dropped_file_with_a_bad_name_fails_with_the_reason(tmp_path):
    queue = RequestQueue(tmp_path / "q")
    (tmp_path / "q" / "pending" / "bad|name.json").write_text("{}")
    (tmp_path / "q" / "pending" / "good.json").write_text("{}")
    claim = queue.claim(WORKER)
    assert claim.id == "good"
    assert queue.status()["failed"][0]["id"] == "bad|name" and "is not allowed" in queue.status()["failed"][0]["error"]


def test_a_crash_retries_until_max_attempts_then_fails_with_the_error(tmp_path):
    queue = RequestQueue(tmp_path / "q", max_attempts=3)
    queue.submit({}, "r")
    states = []
    for _ in range(3):
        claim = queue.claim(WORKER)
        queue.staging(claim).mkdir()  # a half-written attempt
        states.append(queue.fail(claim, "worker died", retry=True))
        assert not queue.staging(claim).exists()
    assert states == ["pending", "pending", "failed"]
    record = queue.record("r")
    assert [a["outcome"] for a in record["attempts"]] == ["crashed"] * 3
    assert record["error"] == "worker died (failed 3 of at most 3 attempts)"
    assert queue.claim(WORKER) is None


def test_a_bad_request_fails_at_once_and_a_release_does_not_count(tmp_path):
    queue = RequestQueue(tmp_path / "q", max_attempts=2)
    queue.submit({}, "bad")
    queue.submit({}, "kept")
    assert queue.fail(queue.claim(WORKER), "not a job", retry=False) == "failed"
    for _ in range(5):  # shutdowns release it again and again; it never fails for that
        queue.release(queue.claim(WORKER))
    claim = queue.claim(WORKER)
    assert claim.id == "kept" and claim.attempt == 6
    assert queue.fail(claim, "crash", retry=True) == "pending"  # the first counted failure of two


def test_an_expired_lease_is_a_crashed_attempt_and_its_holder_loses_the_claim(tmp_path):
    clock = Clock()
    queue = RequestQueue(tmp_path / "q", lease_seconds=60, clock=clock)
    queue.submit({}, "r")
    stale = queue.claim(WORKER)
    clock.now += 30
    assert queue.renew(stale) and queue.recover_expired() == []
    clock.now += 61
    assert queue.recover_expired() == ["r"]
    fresh = queue.claim({"host": "other", "pid": 2})
    assert fresh.attempt == 2 and not queue.renew(stale)
    with pytest.raises(LostClaim):
        queue.complete(stale)
    queue.complete(fresh)
    assert queue.record("r")["attempts"][0]["outcome"] == "crashed" and queue.status()["done"][0]["id"] == "r"


def _claim_all(root, results, go):
    queue = RequestQueue(root)
    go.wait(30)  # all claimers start together
    while (claim := queue.claim({"pid": os.getpid()})) is not None:
        results.put(claim.id)
        queue.complete(claim)


def test_racing_processes_claim_each_request_exactly_once(tmp_path):
    queue = RequestQueue(tmp_path / "q")
    ids = [queue.submit({}, f"r{i:02d}") for i in range(40)]
    context = multiprocessing.get_context("fork")  # the claimers use no torch, so forking is safe and quick
    results, go = context.Queue(), context.Event()
    workers = [context.Process(target=_claim_all, args=(queue.root, results, go)) for _ in range(4)]
    for process in workers:
        process.start()
    go.set()
    for process in workers:
        process.join(60)
    claimed = [results.get(timeout=5) for _ in range(len(ids))]
    assert sorted(claimed) == ids and results.empty()
    assert sorted(e["id"] for e in queue.status()["done"]) == ids


@pytest.fixture
def workspace(tmp_path):
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    save_targets(tmp_path / "targets.safetensors", channels=4, cond=sd3_cond(1))
    job = quick_job(str(tmp_path / "transformer"), str(tmp_path / "targets.safetensors"), output="lora.safetensors",
                    model={"kind": "sd3"})  # fmt: skip
    return tmp_path, job


def test_a_worker_keeps_the_model_loaded_and_gives_the_clis_bytes(workspace):
    root, job = workspace
    queue = RequestQueue(root / "q")
    for name in ("one", "two"):
        queue.submit(job, name)
    queue.submit({**job, "model": {**job["model"], "shift": 2.0}}, "other-shift")
    worker = RequestWorker(str(queue.root), threads=2, name="w")  # the CLI's default thread count
    results = {}
    while (claim := queue.claim(worker.identity())) is not None:
        results[claim.id] = worker.run(claim)
        queue.complete(claim, results[claim.id])
    assert worker.models.loads == 1, "the base model was loaded more than once"
    assert [results[i]["model_loaded"] for i in ("one", "two", "other-shift")] == [True, False, False]
    (root / "job.json").write_text(json.dumps({**job, "output": "cli/lora.safetensors"}))
    assert main(["run", str(root / "job.json")]) == 0
    for name in ("lora.safetensors", "lora.training.safetensors", "lora.preview.png"):
        cli = (root / "cli" / name).read_bytes()
        assert (queue.outputs("one") / name).read_bytes() == cli == (queue.outputs("two") / name).read_bytes(), name
    assert (queue.outputs("other-shift") / "lora.safetensors").read_bytes() != (root / "cli" / "lora.safetensors").read_bytes()
    audit = json.loads((queue.outputs("two") / AUDIT_FILE).read_text())
    assert audit["request"]["id"] == "two" and audit["attempt"]["model_loaded_for_it"] is False
    assert audit["outputs"]["lora.safetensors"] == results["two"]["files"]["lora.safetensors"]
    assert set(audit["base_model"]["files_sha256"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert audit["model_state"]["results_sha256"] == [] and audit["result_state"]["results_sha256"] == [
        results["two"]["files"]["lora.safetensors"]]  # fmt: skip


def test_a_worker_whose_lease_went_elsewhere_stops_training_and_writes_nothing(workspace):
    """The lease expired and another worker took the request: this one stops at its next check
    instead of training a duplicate to the end, and leaves the other's claim alone."""
    root, job = workspace
    clock = Clock()
    queue = RequestQueue(root / "q", lease_seconds=60, clock=clock)
    queue.submit({**job, "config": {**job.get("config", {}), "steps": 50}}, "r")
    stale = queue.claim(WORKER)
    clock.now += 61
    assert queue.recover_expired() == ["r"]
    fresh = queue.claim({"host": "other", "pid": 2})
    worker = RequestWorker(str(queue.root), threads=2)
    worker.queue = queue  # the test's clock
    worker.lease_check_seconds = 0.0
    outcome = worker.run(stale)
    assert outcome["status"] == "failed" and not outcome["retry"] and "stopped" in outcome["error"], outcome
    assert not queue.outputs("r").exists() and not any(queue.root.joinpath("outputs").iterdir())
    assert queue.holds(fresh) and not queue.holds(stale)
    queue.complete(fresh)


def test_a_malformed_request_fails_alone_without_retry_and_writes_nothing(workspace):
    root, job = workspace
    queue = RequestQueue(root / "q")
    (queue.root / "pending" / "broken.json").write_text("{model: ")
    queue.submit({**job, "config": {"steps": 0}}, "zero-steps")
    queue.submit(job, "fine")
    worker = RequestWorker(str(queue.root), threads=2)
    outcomes = {}
    while (claim := queue.claim(worker.identity())) is not None:
        outcome = outcomes[claim.id] = worker.run(claim)
        if outcome["status"] == "done":
            queue.complete(claim, outcome)
        else:
            queue.fail(claim, outcome["error"], outcome["retry"])
    assert outcomes["broken"] == {"status": "failed", "retry": False, "error": outcomes["broken"]["error"]}
    assert "not readable JSON" in outcomes["broken"]["error"]
    assert "steps=0" in outcomes["zero-steps"]["error"] and not outcomes["zero-steps"]["retry"]
    assert outcomes["fine"]["status"] == "done"
    assert sorted(p.name for p in (queue.root / "outputs").iterdir()) == ["fine"]


def test_unlearn_queue_checks_requests_as_run_does_and_status_lists_them(workspace, capsys, caplog):
    root, job = workspace
    (root / "good.json").write_text(json.dumps(job))
    (root / "missing.json").write_text(json.dumps({**job, "targets": "nowhere.safetensors"}))  # relative: the queue folder
    assert main(["queue", str(root / "q"), str(root / "good.json")]) == 0
    assert main(["queue", str(root / "q"), str(root / "missing.json")]) == 2
    assert "nowhere.safetensors' does not exist" in caplog.text
    assert main(["queue", str(root / "q"), str(root / "good.json")]) == 2  # the same id twice
    assert "a request named 'good' is already pending" in caplog.text
    capsys.readouterr()
    assert main(["status", str(root / "q")]) == 0
    printed = capsys.readouterr().out
    assert "pending: 1\n  good  attempts 0\nrunning: 0\ndone: 0\nfailed: 0" in printed
    assert main(["status", str(root / "q"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"][0]["id"] == "good"
    assert main(["status", str(root / "nowhere")]) == 2


def test_a_model_lines_requests_are_claimed_in_order_one_at_a_time(tmp_path):
    queue = RequestQueue(tmp_path / "q")
    queue.submit({"line": "provider-a"}, "first")
    queue.submit({"line": "provider-a"}, "second")
    queue.submit({}, "other")
    queue.submit({"line": "provider-a"}, "third")
    claim = queue.claim(WORKER)
    assert claim.id == "first"
    assert queue.claim(WORKER).id == "other"  # the line waits; other requests do not
    assert queue.claim(WORKER) is None
    queue.complete(claim)
    second = queue.claim(WORKER)
    assert second.id == "second" and queue.line_before("second") == ["first"] and queue.claim(WORKER) is None
    queue.fail(second, "bad targets", retry=False)
    assert queue.claim(WORKER) is None  # the third has no model to train on
    failed = {e["id"]: e["error"] for e in queue.status()["failed"]}
    assert "earlier request 'second' is failed" in failed["third"]


def test_a_worker_trains_each_request_of_a_line_on_the_ones_before_it(workspace):
    root, job = workspace
    save_targets(root / "later.safetensors", channels=4, cond=sd3_cond(1, seed=6), seed=8)
    queue = RequestQueue(root / "q")
    queue.submit({**job, "line": "p"}, "one")
    queue.submit({**job, "targets": str(root / "later.safetensors"), "line": "p"}, "two")
    worker = RequestWorker(str(queue.root), threads=2, name="w")
    while (claim := queue.claim(worker.identity())) is not None:
        queue.complete(claim, worker.run(claim))
    assert [e["id"] for e in queue.status()["done"]] == ["one", "two"]
    one, two = (json.loads((queue.outputs(i) / AUDIT_FILE).read_text()) for i in ("one", "two"))
    assert one["model_state"]["results_sha256"] == [] and two["earlier_requests"] == ["one"] and two["line"] == "p"
    assert two["model_state"] == one["result_state"], "the second did not train on the first"
    assert "lora.merged.safetensors" in two["outputs"] and "lora.merged.safetensors" not in one["outputs"]
    with pytest.raises(InputError, match="line 'p'.*unlearn queue"):  # a line's job alone says where it runs
        run_job({**job, "line": "p"}, root)
