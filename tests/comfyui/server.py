"""A real ComfyUI server subprocess with this pack installed, for HTTP-level tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_path: str, base: Path, models: dict[str, Path]):
        self.comfyui_path = comfyui_path
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        custom = base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        (custom / "instance_unlearn").symlink_to(ROOT, target_is_directory=True)
        shutil.copytree(Path(__file__).parent / "fixture_pack", custom / "unlearn_test_fixtures")
        for kind, path in models.items():
            folder = base / "models" / kind
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name)
        (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
        self.log = open(base / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=comfyui_path, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log_text()[-3000:])
            try:
                self.get("/object_info/KSampler")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError("ComfyUI did not start:\n" + self.log_text()[-3000:])

    def log_text(self) -> str:
        self.log.flush()
        return (self.base / "server.log").read_text(errors="replace")

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str):
        status, body = self.request("GET", path)
        if status != 200:
            raise ConnectionError(f"GET {path}: {status}")
        return json.loads(body)

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": "tests"})
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {body.decode(errors='replace')}")
        prompt_id = json.loads(body)["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if history.get(prompt_id, {}).get("status", {}).get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish:\n" + self.log_text()[-3000:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
