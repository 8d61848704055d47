"""Forget-set route handlers with hostile requests (no server needed; see tests/comfyui for HTTP)."""

import numpy as np
import pytest
from PIL import Image

from instance_unlearn.nodes.routes import MAX_IMAGE_BYTES, ForgetSetHandlers
from instance_unlearn.unlearn_core.forget_set import ForgetSetStore


@pytest.fixture
def setup(tmp_path):
    output = tmp_path / "output"
    (output / "sub").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(output / "img.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(output / "sub" / "dark.png")
    (tmp_path / "secret.png").write_bytes((output / "img.png").read_bytes())
    (output / "fake.png").write_text("not an image")
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
]  # fmt: skip


@pytest.mark.parametrize("body, status", HOSTILE_MARKS)
def test_hostile_marks_are_refused_with_json_errors(setup, body, status):
    handlers, store, _ = setup
    code, payload = handlers.mark(body)
    assert code == status and isinstance(payload.get("error"), str) and payload["error"]
    assert store.names() == []


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
