"""Forget-set route handlers with hostile requests (no server needed; the same requests over HTTP
against a real ComfyUI are in tests/comfyui/test_server_hostile.py)."""

import json

import numpy as np
import pytest
from conftest import tree
from PIL import Image

from instance_unlearn.nodes.routes import MAX_IMAGE_BYTES, ForgetSetHandlers, unknown_route
from instance_unlearn.unlearn_core.data.forget_set import ForgetSetStore


@pytest.fixture
def setup(tmp_path):
    output = tmp_path / "output"
    (output / "sub").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(output / "img.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(output / "sub" / "dark.png")
    (tmp_path / "secret.png").write_bytes((output / "img.png").read_bytes())
    (output / "fake.png").write_text("not an image")
    (output / "link.png").symlink_to(tmp_path / "secret.png")
    Image.fromarray(np.zeros((1, 9000, 3), np.uint8)).save(output / "wide.png")
    store = ForgetSetStore(tmp_path / "store")
    dirs = {"output": str(output), "temp": str(tmp_path / "temp"), "input": str(tmp_path / "input")}
    return ForgetSetHandlers(lambda: store, dirs.get), store, tmp_path


def test_mark_then_list_show_and_serve(setup):
    handlers, store, _ = setup
    status, body = handlers.mark({"forget_set": "faces", "filename": "img.png", "type": "output"})
    assert status == 201 and body["added"] and body["count"] == 1
    status, again = handlers.mark({"forget_set": "faces", "filename": "img.png"})
    assert status == 200 and not again["added"] and again["id"] == body["id"]
    assert handlers.mark({"forget_set": "faces", "filename": "dark.png", "subfolder": "sub"})[0] == 201
    assert handlers.list_sets() == (200, {"forget_sets": [{"name": "faces", "count": 2}]})
    status, shown = handlers.show_set("faces")
    assert status == 200 and shown["targets"][0]["provenance"]["source"] == "context menu"
    status, path = handlers.image_path("faces", body["id"])
    assert status == 200 and path.parent == store.folder("faces") and path.is_file()


HOSTILE_MARKS = [
    ("not a dict", 400), ({}, 400), ({"forget_set": "a"}, 400),
    ({"forget_set": "../x", "filename": "img.png"}, 400),
    ({"forget_set": "/abs", "filename": "img.png"}, 400),
    ({"forget_set": "a", "filename": "../secret.png"}, 400),
    ({"forget_set": "a", "filename": "img.png", "subfolder": ".."}, 400),
    ({"forget_set": "a", "filename": "secret.png", "subfolder": "../"}, 400),
    ({"forget_set": "a", "filename": "img.png", "subfolder": "/etc"}, 400),
    ({"forget_set": "a", "filename": "img.png", "type": "models"}, 400),
    ({"forget_set": "a", "filename": "img.png", "extra": 1}, 400),
    ({"forget_set": "a", "filename": 5}, 400),
    ({"forget_set": "a", "filename": "img.png", "subfolder": 3}, 400),
    ({"forget_set": "a", "filename": "missing.png"}, 404),
    ({"forget_set": "a", "filename": "fake.png"}, 400),
    ({"forget_set": "a\x00b", "filename": "img.png"}, 400),
    ({"forget_set": "a", "filename": "img.png\x00.txt"}, 400),
    ({"forget_set": "con", "filename": "img.png"}, 400),
    ({"forget_set": "a", "filename": "link.png"}, 400),  # a symlink in the output folder pointing outside
    ({"forget_set": "a", "filename": "wide.png"}, 400),  # 9000 pixels wide
    ({"forget_set": "%2e%2e", "filename": "img.png"}, 400),
    ({"forget_set": "a", "filename": "%2e%2e%2fsecret.png"}, 404),  # a literal name, looked up inside the folder
    ({"forget_set": "a" * 101, "filename": "img.png"}, 400),
    ({"forget_set": "a", "filename": "img.png", "type": None}, 400),
    ({"forget_set": ["a"], "filename": "img.png"}, 400),
    ([], 400), (None, 400), (7, 400),
]  # fmt: skip


@pytest.mark.parametrize("body, status", HOSTILE_MARKS)
def test_hostile_marks_are_refused_with_json_errors(setup, body, status):
    handlers, store, tmp_path = setup
    files = tree(tmp_path)
    code, payload = handlers.mark(body)
    assert code == status and isinstance(payload.get("error"), str) and payload["error"]
    json.dumps(payload)  # serialisable as sent
    assert store.names() == [] and tree(tmp_path) == files


def test_oversized_images_and_reads_outside_the_store(setup, monkeypatch):
    handlers, store, tmp_path = setup
    import instance_unlearn.nodes.routes as routes

    monkeypatch.setattr(routes, "MAX_IMAGE_BYTES", 10)
    assert handlers.mark({"forget_set": "a", "filename": "img.png"})[0] == 413
    assert MAX_IMAGE_BYTES > 10
    assert handlers.show_set("../store")[0] == 400
    assert handlers.show_set("nothing")[0] == 404
    assert handlers.image_path("a", "../../secret")[0] == 400
    assert handlers.image_path("..", "0123456789abcdef")[0] == 400
    assert handlers.image_path("a", "0123456789abcdef")[0] == 404


@pytest.fixture
def tampered(setup):
    """A good set, plus sets whose manifests were edited to point outside or were damaged."""
    handlers, store, tmp_path = setup
    status, body = handlers.mark({"forget_set": "good", "filename": "img.png"})
    target_id = body["id"]
    manifest = json.loads((store.folder("good") / "manifest.json").read_text())
    for name, image in (("escaping", "../../secret.png"), ("absolute", str(tmp_path / "secret.png")), ("linked", "link.png")):
        folder = store.root / name
        folder.mkdir()
        entry = {**manifest["targets"][0], "image": image}
        (folder / "manifest.json").write_text(json.dumps({**manifest, "targets": [entry]}))
    (store.root / "linked" / "link.png").symlink_to(tmp_path / "secret.png")
    (store.root / "damaged").mkdir()
    (store.root / "damaged" / "manifest.json").write_text("{not json")
    return handlers, store, tmp_path, target_id


def test_no_file_outside_the_store_is_served_even_from_a_tampered_manifest(tampered):
    handlers, store, tmp_path, target_id = tampered
    files = tree(tmp_path)
    for name in ("escaping", "absolute", "linked"):
        status, result = handlers.image_path(name, target_id)
        assert status == 400 and isinstance(result, dict), (name, result)
        assert "is not allowed" in result["error"] or "leaves its folder" in result["error"], (name, result)
    status, path = handlers.image_path("good", target_id)
    assert status == 200 and store.root.resolve() in path.parents
    assert tree(tmp_path) == files


def test_a_damaged_set_is_reported_not_a_server_error(tampered):
    handlers, store, tmp_path, target_id = tampered
    status, listing = handlers.list_sets()
    assert status == 200
    damaged = next(entry for entry in listing["forget_sets"] if entry["name"] == "damaged")
    assert damaged["count"] is None and "mark the outputs again" in damaged["error"]
    assert {"name": "good", "count": 1} in listing["forget_sets"]
    assert handlers.show_set("damaged")[0] == 400
    assert handlers.image_path("damaged", target_id)[0] == 400


def test_error_texts_name_what_the_client_sent_not_where_the_server_keeps_it(tampered):
    handlers, store, tmp_path, target_id = tampered
    (tmp_path / "output" / "sub" / "fake.png").write_text("not an image")
    answers = {
        "fake.png": handlers.mark({"forget_set": "a", "filename": "fake.png"}),
        "sub/fake.png": handlers.mark({"forget_set": "a", "filename": "fake.png", "subfolder": "sub"}),
        "damaged": handlers.show_set("damaged"),
        "'damaged'": handlers.image_path("damaged", target_id),
        "set 'damaged'": handlers.mark({"forget_set": "damaged", "filename": "img.png"}),
    }
    for name, (status, payload) in answers.items():
        assert status == 400 and name in payload["error"], (name, payload)
    listed = next(s for s in handlers.list_sets()[1]["forget_sets"] if s["name"] == "damaged")
    assert "delete forget_sets/damaged/manifest.json" in listed["error"], listed
    text = json.dumps([answers, listed])
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, text


UNKNOWN_ROUTES = [
    ("GET", "nothing", 404), ("GET", "forget_sets/a/b/c.png", 404), ("GET", "forget_sets/a/x.jpg", 404),
    ("POST", "forget_sets", 405), ("DELETE", "forget_sets/a", 405), ("GET", "mark", 405), ("PUT", "mark", 405),
    ("GET", "", 404), ("GET", "../../etc/passwd", 404),
]  # fmt: skip


@pytest.mark.parametrize("method, tail, status", UNKNOWN_ROUTES)
def test_any_other_request_under_the_pack_prefix_gets_a_json_error(method, tail, status):
    code, payload = unknown_route(method, tail)
    assert code == status and "the pack serves: GET /unlearn/forget_sets" in payload["error"]
