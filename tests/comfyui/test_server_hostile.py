"""Hostile HTTP requests to the pack's routes on a real ComfyUI server.

Each request is sent byte for byte (http.client, no client-side normalisation) and must get a
JSON error with a 4xx code; nothing may be written anywhere, in the store or outside it, and
no response may carry the bytes of a file outside the store. The same hostile bodies at the
handler level are in tests/test_routes.py.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time

import numpy as np
import pytest
from conftest import tree
from PIL import Image

from instance_unlearn.nodes.routes import MAX_SIDE

from .conftest import COMFYUI_PATH

pytestmark = pytest.mark.comfyui

ID = "{id}"  # replaced by the id of the marked image


def send(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None, chunked: bool = False):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        if chunked:
            connection.request(method, path, body=iter([body]), headers=headers or {}, encode_chunked=True)
        else:
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def post_json(value, **headers) -> dict:
    text = value if isinstance(value, str) else json.dumps(value)
    return {"method": "POST", "path": "/api/unlearn/mark", "body": text.encode(),
            "headers": {"Content-Type": "application/json", **headers}}  # fmt: skip


def get(path: str) -> dict:
    return {"method": "GET", "path": path}


def mark(**fields) -> dict:
    return post_json({"forget_set": "hostile", "filename": "img.png", **fields})


SETS = "/api/unlearn/forget_sets"
HOSTILE = [
    # path parameters: traversal, encodings, reserved and absolute names
    ("set '..'", get(f"{SETS}/.."), 400),
    ("set %2e%2e", get(f"{SETS}/%2e%2e"), 400),
    ("set %2E%2E%2F%2E%2E%2Fuser", get(f"{SETS}/%2E%2E%2F%2E%2E%2Fuser"), 400),
    ("set ..%2f..%2fuser", get(f"{SETS}/..%2f..%2fuser"), 400),
    ("set %2fetc%2fpasswd", get(f"{SETS}/%2fetc%2fpasswd"), 400),
    ("set ..%5c..%5csecret", get(f"{SETS}/..%5c..%5csecret"), 400),
    ("set double-encoded %252e%252e", get(f"{SETS}/%252e%252e"), 400),
    ("set con", get(f"{SETS}/con"), 400),
    ("set with NUL", get(f"{SETS}/a%00b"), 400),
    ("set name of 5000 characters", get(f"{SETS}/{'a' * 5000}"), 400),
    ("damaged set", get(f"{SETS}/damaged"), 400),
    ("image id traversal", get(f"{SETS}/good/%2e%2e%2f%2e%2e%2fmanifest.png"), 400),
    ("image id upper case", get(f"{SETS}/good/{ID.upper()}.png"), 400),
    ("image id unknown", get(f"{SETS}/good/0123456789abcdef.png"), 404),
    ("image of set %2e%2e", get(f"{SETS}/%2e%2e/{ID}.png"), 400),
    ("image path with .. segments", get(f"{SETS}/good/../../../../outside/secret.png"), 404),
    ("image via a manifest pointing outside", get(f"{SETS}/escaping/{ID}.png"), 400),
    ("image via an absolute path in the manifest", get(f"{SETS}/absolute/{ID}.png"), 400),
    ("image via a symlink in the set", get(f"{SETS}/linked/{ID}.png"), 400),
    ("image of a damaged set", get(f"{SETS}/damaged/{ID}.png"), 400),
    ("no such route", get("/api/unlearn/nothing"), 404),
    ("too deep a route", get(f"{SETS}/good/{ID}/x.png"), 404),
    ("POST to a GET route", {"method": "POST", "path": SETS, "body": b"{}", "headers": {"Content-Type": "application/json"}}, 405),
    ("DELETE a set", {"method": "DELETE", "path": f"{SETS}/good"}, 405),
    ("GET the mark route", get("/api/unlearn/mark"), 405),
    # the body of a mark: format, size, content type
    ("not JSON", post_json("{forget_set: x"), 400),
    ("JSON array", post_json([1, 2]), 400),
    ("JSON null", post_json("null"), 400),
    ("missing fields", post_json({}), 400),
    ("missing filename", post_json({"forget_set": "hostile"}), 400),
    ("invalid UTF-8", {**post_json(""), "body": b'{"forget_set": "\xff\xfe"}'}, 400),
    ("text/plain", {**post_json({"forget_set": "hostile", "filename": "img.png"}), "headers": {"Content-Type": "text/plain"}}, 415),
    ("form data", {**post_json(""), "body": b"forget_set=x&filename=img.png",
                   "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415),
    ("multipart", {**post_json(""), "body": b"--b\r\n\r\nx\r\n--b--", "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 415),
    ("no content type", {**post_json({"forget_set": "hostile", "filename": "img.png"}), "headers": {}}, 415),
    ("1 MiB body", post_json({"forget_set": "hostile", "filename": "img.png", "pad": "x" * (1 << 20)}), 413),
    ("chunked body without a length", {**post_json({"forget_set": "hostile", "filename": "img.png"}), "chunked": True}, 413),
    ("nested 5000 deep", post_json("[" * 5000 + "]" * 5000), 400),
    ("huge integer", post_json('{"forget_set": ' + "9" * 5000 + ', "filename": "img.png"}'), 400),
    ("infinite number", post_json('{"forget_set": "hostile", "filename": 1e999}'), 400),
    # the fields of a mark: traversal, absolute paths, reserved names, types
    ("set ../escape", mark(forget_set="../escape"), 400),
    ("set /abs", mark(forget_set="/abs"), 400),
    ("set %2e%2e", mark(forget_set="%2e%2e"), 400),
    ("set con", mark(forget_set="con"), 400),
    ("set with NUL", mark(forget_set="a\x00b"), 400),
    ("set as a list", mark(forget_set=["hostile"]), 400),
    ("filename ../outside/secret.png", mark(filename="../../outside/secret.png"), 400),
    ("filename absolute", mark(filename="/etc/passwd"), 400),
    ("filename ..%2fsecret.png", mark(filename="..%2fsecret.png"), 404),
    ("filename with NUL", mark(filename="img.png\x00.txt"), 400),
    ("filename as a number", mark(filename=5), 400),
    ("subfolder ../..", mark(subfolder="../.."), 400),
    ("subfolder absolute", mark(subfolder="/etc"), 400),
    ("type models", mark(type="models"), 400),
    ("unknown field", mark(path="/etc/passwd"), 400),
    ("symlink in the output folder", mark(filename="link.png"), 400),
    ("image 9000 pixels wide", mark(filename="wide.png"), 400),
    ("image file of 65 MiB", mark(filename="huge.png"), 413),
    ("text file named .png", mark(filename="fake.png"), 400),
    ("missing image", mark(filename="missing.png"), 404),
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile_setup(server, tmp_path_factory):
    """Images in the server's output folder, a secret outside it, and sets tampered on disk."""
    outside = tmp_path_factory.mktemp("outside")
    secret = np.full((8, 8, 3), 7, np.uint8)
    Image.fromarray(secret).save(outside / "secret.png")
    output = server.base / "output"
    output.mkdir(exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(output / "img.png")
    (output / "link.png").symlink_to(outside / "secret.png")
    Image.fromarray(np.zeros((1, 9000, 3), np.uint8)).save(output / "wide.png")
    with open(output / "huge.png", "wb") as stream:  # sparse: sized without using the disk
        stream.write(b"\x89PNG\r\n\x1a\n")
        stream.truncate(65 * 1024 * 1024)
    (output / "fake.png").write_text("not an image")
    status, _, body = send(server, **post_json({"forget_set": "good", "filename": "img.png"}))
    assert status == 201, body
    target_id = json.loads(body)["id"]
    store = output / "unlearn" / "forget_sets"
    manifest = json.loads((store / "good" / "manifest.json").read_text())
    for name, image in (("escaping", "../../../../outside/secret.png"), ("absolute", str(outside / "secret.png")),
                        ("linked", "link.png")):  # fmt: skip
        (store / name).mkdir()
        (store / name / "manifest.json").write_text(json.dumps({**manifest, "targets": [{**manifest["targets"][0], "image": image}]}))
    (store / "linked" / "link.png").symlink_to(outside / "secret.png")
    (store / "damaged").mkdir()
    (store / "damaged" / "manifest.json").write_text("{not json")
    return {"id": target_id, "outside": outside, "secret": (outside / "secret.png").read_bytes()}


def watched(server, setup) -> dict:
    """Everything the server could write to: its base folder (less its own log and user data) and outside."""
    files = {f"base/{k}": v for k, v in tree(server.base).items() if not k.startswith(("user", "server.log"))}
    return files | {f"outside/{k}": v for k, v in tree(setup["outside"]).items()}


@pytest.mark.parametrize("what, request_, status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_a_json_4xx_and_writes_nothing(server, hostile_setup, what, request_, status):
    request_ = dict(request_, path=request_["path"].replace(ID, hostile_setup["id"]).replace(ID.upper(), hostile_setup["id"].upper()))
    before = watched(server, hostile_setup)
    code, content_type, body = send(server, **request_)
    assert code == status, f"{what}: {code} {body[:300]!r}"
    assert content_type.startswith("application/json"), f"{what}: not JSON ({content_type}): {body[:200]!r}"
    payload = json.loads(body)
    assert isinstance(payload.get("error"), str) and len(payload["error"]) > 10, payload
    assert hostile_setup["secret"] not in body
    assert watched(server, hostile_setup) == before, f"{what} wrote something"


def test_the_store_still_serves_its_own_files_after_the_attack(server, hostile_setup):
    status, content_type, body = send(server, **get(f"{SETS}/good/{hostile_setup['id']}.png"))
    assert status == 200 and content_type == "image/png" and body.startswith(b"\x89PNG")
    status, _, body = send(server, **get(SETS))
    listing = {entry["name"]: entry for entry in json.loads(body)["forget_sets"]}
    assert status == 200 and listing["good"]["count"] == 1 and listing["damaged"]["count"] is None
    assert "hostile" not in listing and "escape" not in os.listdir(server.base / "output" / "unlearn" / "forget_sets")


# Errors that name a file or folder of the server: what the client sees names what it sent.
PATH_ERRORS = [
    ("text file named .png", mark(filename="fake.png"), "fake.png"),
    ("listing with a damaged set", get(SETS), "damaged"),
    ("damaged set", get(f"{SETS}/damaged"), "damaged"),
    ("image of a damaged set", get(f"{SETS}/damaged/{ID}.png"), "damaged"),
    ("mark into a damaged set", mark(forget_set="damaged"), "damaged"),
]  # fmt: skip


@pytest.mark.parametrize("what, request_, name", PATH_ERRORS, ids=[e[0] for e in PATH_ERRORS])
def test_error_texts_name_what_the_client_sent_not_where_the_server_keeps_it(server, hostile_setup, what, request_, name):
    request_ = dict(request_, path=request_["path"].replace(ID, hostile_setup["id"]))
    _, _, body = send(server, **request_)
    payload = json.loads(body)
    errors = [payload["error"]] if "error" in payload else [s["error"] for s in payload["forget_sets"] if "error" in s]
    assert errors and all(name in error for error in errors), payload
    server_folders = {str(server.base), str(server.base.resolve()), COMFYUI_PATH}
    assert not [folder for folder in server_folders if folder in body.decode()], payload


def test_a_large_mark_does_not_hold_up_other_requests(server):
    """Decoding, hashing and storing an 8192x8192 image takes seconds; the server meanwhile answers others."""
    ramp = np.arange(MAX_SIDE, dtype=np.uint32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :] % 256, ramp[:, None] % 256, (ramp[:, None] + ramp[None, :]) // 64 % 256), axis=-1)
    (server.base / "output").mkdir(exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(server.base / "output" / "large.png", compress_level=1)  # about 3 MB
    finished = {}

    def timed(name, **request_):
        status, _, body = send(server, **request_)
        finished[name] = (time.monotonic(), status, body[:300])

    marking = threading.Thread(target=timed, args=("mark",), kwargs=post_json({"forget_set": "large", "filename": "large.png"}))
    started = time.monotonic()
    marking.start()
    time.sleep(0.5)  # the mark is being processed
    timed("other", **get("/api/system_stats"))
    marking.join(120)
    assert finished["mark"][1] == 201 and finished["other"][1] == 200, finished
    mark_seconds = finished["mark"][0] - started
    assert mark_seconds > 1.5, f"the mark took {mark_seconds:.1f} s: too quick to show anything"
    assert finished["other"][0] < finished["mark"][0] - 0.5, (
        f"the other request was answered {finished['other'][0] - started:.1f} s in, the mark {mark_seconds:.1f} s in")


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(server):
    logged = len(server.log_text())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(b"POST /api/unlearn/mark HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b'Content-Length: 1000\r\n\r\n{"forget_set": "x", "filename": ')  # fmt: skip
        time.sleep(0.3)  # the server is reading the body
    deadline = time.monotonic() + 15
    while not re.search(r"hung up|Traceback", server.log_text()[logged:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    after = server.log_text()[logged:]
    assert "hung up" in after, f"the server did not notice the hang-up:\n{after[-3000:]}"
    assert not re.search(r"Traceback|ConnectionResetError|Error handling request", after), after[-3000:]
