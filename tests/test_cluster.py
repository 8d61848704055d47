"""The request queue on a local Ray cluster (2 CPU workers, tiny SD3 transformer): every request
done once with the CLI's bytes, a worker killed mid-request retried elsewhere, a bad request
failing alone, and shutdowns that finish or release what runs. One cluster for the module."""

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, load_benchmark, make_tiny_sd3, quick_job, save_targets, sd3_cond

from unlearn_core.cli import main
from unlearn_core.serve.cluster import (
    ClusterUnavailable,
    ServeSettings,
    Shutdown,
    require_ray,
    serve,
)
from unlearn_core.serve.request_queue import Claim, RequestQueue
from unlearn_core.serve.request_worker import AUDIT_FILE

COMPARED = ("lora.safetensors", "lora.training.safetensors", "lora.preview.png")
SETTINGS = dict(workers=2, until_empty=True, poll_seconds=0.2, lease_seconds=60.0)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster; skipped in an environment without the cluster extra (ComfyUI's own
    Python, say), where the tests of the refusal without Ray still run."""
    try:
        ray = require_ray()
    except ClusterUnavailable as error:
        pytest.skip(str(error))
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_tiny_sd3().save_pretrained(root / "transformer")
    save_targets(root / "targets.safetensors", channels=4, cond=sd3_cond(1))
    return root


def job(inputs, seed=0, steps=3, **config):
    return quick_job(str(inputs / "transformer"), str(inputs / "targets.safetensors"), output="lora.safetensors",
                     model={"kind": "sd3"}, config={"steps": steps, "seed": seed, **config})  # fmt: skip


def cli_bytes(request: dict, folder) -> dict[str, bytes]:
    """The same job run alone with `unlearn run` (the workers' one thread each)."""
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps(request))
    try:
        assert main(["--threads", "1", "run", str(folder / "job.json")]) == 0
    finally:
        torch.set_num_threads(2)  # the suite's setting (conftest)
    return {name: (folder / name).read_bytes() for name in COMPARED}


def served_bytes(queue: RequestQueue, request_id: str) -> dict[str, bytes]:
    return {name: (queue.outputs(request_id) / name).read_bytes() for name in COMPARED}


def serve_in_background(root, shutdown=None, **settings):
    result = {}
    thread = threading.Thread(target=lambda: result.update(serve(root, ServeSettings(**{**SETTINGS, **settings}), shutdown)))
    thread.start()
    return thread, result


def wait_until(condition, timeout=120.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def running_in_worker(queue: RequestQueue, request_id: str) -> bool:
    """Claimed and started in a worker (its staging folder exists), not just claimed."""
    lease = queue.lease(request_id)
    return lease is not None and queue.staging(Claim(request_id, lease["attempt"], lease["token"])).exists()


def test_every_request_is_done_once_a_bad_one_fails_alone_and_outputs_equal_the_clis(cluster, inputs, tmp_path):
    queue = RequestQueue(tmp_path / "q")
    good = {f"r{seed}": job(inputs, seed=seed) for seed in range(4)}
    for name, request in good.items():
        queue.submit(request, name)
    queue.submit(job(inputs, lora_rank=64), "rank-too-large")  # fails inside the worker, after loading the model
    (queue.root / "pending" / "not-json.json").write_text("{model: ")
    counts = serve(queue.root, ServeSettings(**SETTINGS))
    assert counts == {"done": 4, "failed": 2, "retried": 0, "released": 0, "workers_started": 2}
    status = queue.status()
    assert sorted(e["id"] for e in status["done"]) == sorted(good) and not status["pending"] and not status["running"]
    errors = {e["id"]: e["error"] for e in status["failed"]}
    assert "larger than layer" in errors["rank-too-large"] and "not readable JSON" in errors["not-json"]
    audits = [json.loads((queue.outputs(name) / AUDIT_FILE).read_text()) for name in good]
    for name in good:
        assert [a["outcome"] for a in queue.record(name)["attempts"]] == ["done"]
    workers = {a["attempt"]["worker"]["pid"] for a in audits}
    assert sum(a["attempt"]["model_loaded_for_it"] for a in audits) == len(workers) <= 2, "a worker reloaded the model"
    for name, request in good.items():
        assert served_bytes(queue, name) == cli_bytes(request, tmp_path / "cli" / name), name
    assert served_bytes(queue, "r0") != served_bytes(queue, "r1")  # the seeds reach training


def test_a_worker_killed_mid_request_is_replaced_and_the_request_retried(cluster, inputs, tmp_path):
    queue = RequestQueue(tmp_path / "q")
    long_job = job(inputs, steps=150)
    queue.submit(long_job, "long")
    thread, counts = serve_in_background(queue.root)
    wait_until(lambda: running_in_worker(queue, "long"), what="the request to start")
    time.sleep(0.5)
    victim = queue.lease("long")["worker"]["pid"]
    os.kill(victim, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    assert counts["done"] == 1 and counts["retried"] == 1 and counts["workers_started"] == 3
    attempts = queue.record("long")["attempts"]
    assert [a["outcome"] for a in attempts] == ["crashed", "done"], attempts
    assert f"(pid {victim} on" in attempts[0]["error"] and "died while running the request" in attempts[0]["error"]
    assert attempts[1]["worker"]["pid"] != victim
    audit = json.loads((queue.outputs("long") / AUDIT_FILE).read_text())
    assert audit["attempt"]["number"] == 2 and audit["previous_attempts"][0]["outcome"] == "crashed"
    assert not [p for p in (queue.root / "outputs").iterdir() if p.name.startswith(".")], "a staging folder was left"
    assert served_bytes(queue, "long") == cli_bytes(long_job, tmp_path / "cli")


def test_a_model_line_survives_a_worker_killed_between_its_requests(cluster, inputs, tmp_path):
    """Two requests of one line and one worker: the worker is killed once the first is done; the
    replacement trains the second on the first (exactly once each, the audit records chained)."""
    queue = RequestQueue(tmp_path / "q")
    queue.submit({**job(inputs), "line": "provider"}, "first")
    queue.submit({**job(inputs, steps=40), "line": "provider"}, "second")
    thread, counts = serve_in_background(queue.root, workers=1)
    wait_until(lambda: queue.path("done", "first").exists(), what="the first request")
    victim = queue.record("first")["attempts"][-1]["worker"]["pid"]
    os.kill(victim, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    assert counts["done"] == 2 and counts["workers_started"] == 2
    assert [e["id"] for e in queue.status()["done"]] == ["first", "second"]
    outcomes = [a["outcome"] for a in queue.record("second")["attempts"]]
    assert outcomes in (["done"], ["crashed", "done"]), outcomes  # killed before or while it ran, done once
    assert queue.record("second")["attempts"][-1]["worker"]["pid"] != victim
    first, second = (json.loads((queue.outputs(i) / AUDIT_FILE).read_text()) for i in ("first", "second"))
    assert second["model_state"] == first["result_state"] and second["earlier_requests"] == ["first"]


def test_a_shutdown_finishes_running_requests_and_claims_no_more(cluster, inputs, tmp_path):
    queue = RequestQueue(tmp_path / "q")
    for name in ("a", "b", "c"):
        queue.submit(job(inputs, steps=100), name)
    shutdown = Shutdown()
    thread, counts = serve_in_background(queue.root, shutdown, until_empty=False)
    wait_until(lambda: len(queue.ids("running")) == 2, what="two requests to run")
    shutdown.request()
    thread.join(300)
    assert counts["done"] == 2 and counts["released"] == 0
    assert len(queue.ids("done")) == 2 and len(queue.ids("pending")) == 1


def test_a_second_shutdown_request_releases_running_requests_for_the_next_serve(cluster, inputs, tmp_path):
    queue = RequestQueue(tmp_path / "q")
    queue.submit(job(inputs, steps=200), "long")
    shutdown = Shutdown()
    thread, counts = serve_in_background(queue.root, shutdown, workers=1)
    wait_until(lambda: running_in_worker(queue, "long"), what="the request to start")
    shutdown.request()
    shutdown.request()
    thread.join(120)
    assert counts["released"] == 1 and counts["done"] == 0
    assert queue.ids("pending") == ["long"] and not list((queue.root / "outputs").iterdir())
    assert serve(queue.root, ServeSettings(**SETTINGS))["done"] == 1
    assert [a["outcome"] for a in queue.record("long")["attempts"]] == ["released", "done"]


def test_unlearn_serve_joins_a_running_cluster_and_sigterm_releases_its_request(cluster, inputs, tmp_path):
    """The command as docs/PROVIDERS.md runs it, pointed at this module's cluster with --address,
    its log written to a file: the worker's lines arrive there as plain text, without colour codes."""
    queue = RequestQueue(tmp_path / "q")
    queue.submit(job(inputs, steps=3000, balance_ratio=0.5), "long")  # an ignored option: the worker logs a warning
    address = cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "unlearn_core", "serve", str(queue.root), "--address", address, "--workers", "1",
               "--grace-seconds", "0", "--lease-seconds", "60"]  # fmt: skip
    log_file = tmp_path / "serve.log"
    environment = {k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"}  # as a user's shell has it
    with open(log_file, "w") as log_stream:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_stream, text=True, env=environment)
    worker_line = re.compile(r"^\S*\(RequestWorker pid=\d+\)", re.M)
    try:
        wait_until(lambda: (running_in_worker(queue, "long") and worker_line.search(log_file.read_text()))
                   or process.poll() is not None, what="the request to start and its worker to log")  # fmt: skip
        assert process.poll() is None, log_file.read_text()[-3000:]
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    log_text = log_file.read_text()
    assert process.returncode == 0, log_text[-3000:]
    assert "\x1b[" not in log_text, [line for line in log_text.splitlines() if "\x1b[" in line]
    assert json.loads(out.strip().splitlines()[-1])["released"] == 1
    assert queue.ids("pending") == ["long"] and queue.record("long")["attempts"][0]["outcome"] == "released"


def test_without_ray_serve_says_how_to_install_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ClusterUnavailable, match=r"pip install 'instance-unlearn\[cluster\]'"):
        require_ray()
    assert main(["serve", str(tmp_path / "q"), "--until-empty"]) == 2
    assert "Ray, which is not installed" in caplog.text


def test_the_throughput_benchmark_runs(cluster, tmp_path):
    """benchmarks/queue_throughput.py end to end on one short request (its figures are not asserted)."""
    bench = load_benchmark("queue_throughput")
    out = tmp_path / "queue_throughput.json"
    assert bench.main(["--requests", "1", "--steps", "1", "--phases", "process,serve1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["serve1"]["model_loads"] == 1 and result["serve1"]["requests_per_minute"] > 0
    assert math.isfinite(result["load_once_saving"]["seconds_per_request"])
