"""Web routes of the pack: forget sets for the frontend (mark an image from its context menu).

    GET  /api/unlearn/forget_sets                  names and sizes
    GET  /api/unlearn/forget_sets/{name}           the targets of one set
    GET  /api/unlearn/forget_sets/{name}/{id}.png  one marked image (only files of the store)
    POST /api/unlearn/mark                         {"forget_set", "filename", "subfolder", "type"}

The handlers are plain functions over validated dicts returning (status, JSON); the aiohttp
layer only checks the content type, sizes and parses requests. Every error, including any
other path under /unlearn/, is JSON with a 4xx code and a message, and names the server's
folders as ComfyUI does ("output/..."), never by their absolute path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..unlearn_core.data.forget_set import MAX_SIDE, ForgetSetStore
from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.files import safe_name

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MAX_IMAGE_BYTES = 64 * 1024 * 1024
IMAGE_TYPES = ("output", "temp", "input")
MARK_FIELDS = {"forget_set", "filename", "subfolder", "type"}
_ID = re.compile(r"^[0-9a-f]{16}$")

Response = tuple[int, dict]


def _error(status: int, message: str) -> Response:
    return status, {"error": message}


class ForgetSetHandlers:
    """The route logic, independent of aiohttp (tested directly and through a real server)."""

    def __init__(self, store: Callable[[], ForgetSetStore], directory_for: Callable[[str], str | None]):
        self.store = store
        self.directory_for = directory_for

    def public_text(self, text: str) -> str:
        """``text`` with the server's folders written as ComfyUI names them: ``output/...`` (or
        ``input``, ``temp``), and ``forget_sets/...`` for a store outside them. The core's errors
        name absolute paths, which help on the server's console but tell a web client where the
        server keeps its files."""
        folders = [(kind, root) for kind in IMAGE_TYPES if (root := self.directory_for(kind))]
        folders.sort(key=lambda folder: -len(str(folder[1])))  # a folder inside another first
        folders.append(("forget_sets", self.store().root))  # after: in ComfyUI it lies inside output/
        for label, root in folders:
            for spelling in dict.fromkeys((str(Path(root)), str(Path(root).resolve()))):
                text = text.replace(spelling, label)
        return text

    def _refusal(self, status: int, error: Exception) -> Response:
        return _error(status, self.public_text(str(error)))

    def list_sets(self) -> Response:
        store = self.store()
        sets = []
        for name in store.names():
            try:
                sets.append({"name": name, "count": len(store.records(name))})
            except InputError as error:  # one damaged set must not hide the others
                sets.append({"name": name, "count": None, "error": self.public_text(str(error))})
        return 200, {"forget_sets": sets}

    def show_set(self, name: str) -> Response:
        try:
            name = safe_name(name, "forget-set name")
            records = self.store().records(name)
        except InputError as error:
            return self._refusal(400, error)
        if not records:
            return _error(404, f"forget set {name!r} does not exist or is empty")
        targets = [{"id": r.id, "width": r.width, "height": r.height, "has_mask": r.mask is not None,
                    "has_latent": r.latent is not None, "provenance": r.provenance} for r in records]  # fmt: skip
        return 200, {"name": name, "targets": targets}

    def image_path(self, name: str, target_id: str) -> tuple[int, dict | Path]:
        try:
            name = safe_name(name, "forget-set name")
        except InputError as error:
            return _error(400, str(error))
        if not _ID.match(target_id):
            return _error(400, "target id must be 16 lowercase hex digits")
        store = self.store()
        try:
            for record in store.records(name):
                if record.id == target_id:
                    return 200, store.image_file(name, record)  # refuses paths outside the set's folder
        except InputError as error:
            return self._refusal(400, error)
        return _error(404, f"no target {target_id} in forget set {name!r}")

    def mark(self, body) -> Response:
        if not isinstance(body, dict):
            return _error(400, "send a JSON object")
        unknown = sorted(set(body) - MARK_FIELDS)
        if unknown:
            return _error(400, f"unknown fields {unknown}; allowed: {sorted(MARK_FIELDS)}")
        for field in ("forget_set", "filename"):
            if not isinstance(body.get(field), str) or not body[field]:
                return _error(400, f"'{field}' must be a non-empty string")
        for field in ("subfolder", "type"):
            if field in body and not isinstance(body[field], str):
                return _error(400, f"'{field}' must be a string")
        kind = body.get("type", "output")
        if kind not in IMAGE_TYPES:
            return _error(400, f"'type' must be one of {list(IMAGE_TYPES)}")
        subfolder = body.get("subfolder", "")
        shown = f"{kind} image {subfolder + '/' if subfolder else ''}{body['filename']}"  # what the client asked for
        try:
            name = safe_name(body["forget_set"], "forget-set name")
            path = self._image_file(kind, subfolder, body["filename"])
        except InputError as error:
            return self._refusal(400, error)
        except FileNotFoundError:
            return _error(404, f"no {shown}")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return _error(413, f"the image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
        try:
            pixels = _read_image(path, shown)
            record, added = self.store().add(name, pixels, provenance={
                "source": "context menu", "filename": body["filename"], "subfolder": subfolder, "type": kind})  # fmt: skip
        except InputError as error:
            return self._refusal(400, error)
        return (201 if added else 200), {"forget_set": name, "id": record.id, "added": added,
                                         "count": len(self.store().records(name))}  # fmt: skip

    def _image_file(self, kind: str, subfolder: str, filename: str) -> Path:
        root = self.directory_for(kind)
        if root is None:
            raise InputError(f"no {kind} folder is configured")
        if "/" in filename or "\\" in filename or filename in (".", "..") or "\x00" in filename:
            raise InputError("'filename' must be a bare file name")
        if "\x00" in subfolder or os.path.isabs(subfolder):
            raise InputError("'subfolder' must be a relative folder")
        base = Path(root).resolve()
        path = (base / subfolder / filename).resolve()
        if base not in path.parents:
            raise InputError("the image path leaves its folder")
        if not path.is_file():
            raise FileNotFoundError(path)
        return path


def _read_image(path: Path, shown: str) -> np.ndarray:
    """The pixels of ``path``; errors name it as ``shown`` (PIL's own messages hold the path)."""
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_SIDE:
                raise InputError(f"the image is {image.size[0]}x{image.size[1]}; at most {MAX_SIDE} pixels a side")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Image.UnidentifiedImageError:
        raise InputError(f"the {shown} is not an image file that PIL can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise InputError(f"the {shown} is not a readable image: {error}") from None


ROUTES = (
    ("GET", re.compile(r"^forget_sets$"), "/unlearn/forget_sets"),
    ("GET", re.compile(r"^forget_sets/[^/]+$"), "/unlearn/forget_sets/{name}"),
    ("GET", re.compile(r"^forget_sets/[^/]+/[^/]+\.png$"), "/unlearn/forget_sets/{name}/{id}.png"),
    ("POST", re.compile(r"^mark$"), "/unlearn/mark"),
)


def unknown_route(method: str, tail: str) -> Response:
    """405 for a known path with another method, else 404; both list what the pack serves."""
    served = ", ".join(f"{m} {template}" for m, _, template in ROUTES)
    allowed = sorted({m for m, pattern, _ in ROUTES if pattern.match(tail)})
    if allowed and method not in allowed and not (method == "HEAD" and "GET" in allowed):
        return _error(405, f"{method} is not allowed here; use {' or '.join(allowed)} (the pack serves: {served})")
    return _error(404, f"no such route /unlearn/{tail[:100]}; the pack serves: {served}")


def register(routes, handlers: ForgetSetHandlers) -> None:
    """Attach the handlers to ComfyUI's route table (also served under /api/)."""
    from aiohttp import web

    def respond(status: int, payload: dict):
        return web.json_response(payload, status=status)

    @routes.get("/unlearn/forget_sets")
    async def list_sets(request):
        return respond(*handlers.list_sets())

    @routes.get("/unlearn/forget_sets/{name}")
    async def show_set(request):
        return respond(*handlers.show_set(request.match_info["name"]))

    @routes.get("/unlearn/forget_sets/{name}/{target_id}.png")
    async def image(request):
        status, result = handlers.image_path(request.match_info["name"], request.match_info["target_id"])
        if status != 200:
            return respond(status, result)
        return web.FileResponse(result, headers={"Content-Type": "image/png"})

    @routes.post("/unlearn/mark")
    async def mark(request):
        if request.content_type != "application/json":
            return respond(415, {"error": f"send Content-Type: application/json, not {request.content_type or 'nothing'}"})
        if request.content_length is None or request.content_length > MAX_BODY_BYTES:
            return respond(413, {"error": f"send a JSON body with a Content-Length of at most {MAX_BODY_BYTES} bytes"})
        try:
            raw = await request.read()  # the whole declared body, at most MAX_BODY_BYTES
        except ConnectionResetError:  # the client hung up mid-body: nobody is left to answer
            log.info("unlearn: a mark request ended before its body was sent (the client hung up)")
            return respond(400, {"error": "the body ended before its Content-Length"})
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            return respond(400, {"error": "the body is not valid JSON; send one JSON object"})
        # decoding, hashing and storing a large image take seconds: in a thread, so that the
        # server's event loop goes on answering every other request meanwhile
        return respond(*await asyncio.to_thread(handlers.mark, body))

    @routes.route("*", "/unlearn/{tail:.*}")
    async def unknown(request):
        """Any other request under /unlearn/: a JSON error instead of the server's plain-text page."""
        status, payload = unknown_route(request.method, request.match_info["tail"])
        return respond(status, payload)
