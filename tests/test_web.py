"""The web extension, statically: its imports resolve where ComfyUI serves it, and every node has help.

ComfyUI serves web/ at /extensions/<pack folder>/, so web/js/x.js is /extensions/<pack>/js/x.js and
the frontend's modules (/scripts/app.js, /scripts/api.js) are three levels up. The browser tests
(tests/comfyui/test_browser.py) run the extension for real.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
SCRIPTS = sorted((WEB / "js").glob("*.js"))
IMPORT = re.compile(r"""^\s*import\s+[^;]*?from\s+["']([^"']+)["']""", re.M)
FRONTEND_MODULES = {"/scripts/app.js", "/scripts/api.js"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_imports_resolve_to_the_frontends_modules(script):
    served_at = "/extensions/any_pack_folder/" + script.relative_to(WEB).as_posix()
    for target in IMPORT.findall(script.read_text()):
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(served_at), target))
        assert resolved in FRONTEND_MODULES, f"{script.name} imports {target!r}, which the browser fetches as {resolved}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_extensions_use_documented_hooks_only(script):
    text = script.read_text()
    names = re.findall(r"""registerExtension\(\{\s*name:\s*["']([^"']+)["']""", text)
    assert names and all(name.startswith("unlearn.") for name in names)
    # no prototype monkeypatching, except LiteGraph's getExtraMenuOptions, the documented node-menu
    # hook of frontends older than getNodeMenuItems, and only where that hook is missing
    assert set(re.findall(r"\.prototype\.(\w+)", text)) <= {"getExtraMenuOptions"}
    if ".prototype." in text:
        assert "typeof app.collectNodeMenuItems" in text, "the legacy menu must be a fallback for old frontends only"
    assert not re.search(r"\bwindow\.[A-Za-z_]+\s*=", text), "no window globals"


def test_every_node_has_a_help_page():
    nodes = json.loads((ROOT / "tests" / "comfyui" / "schema_snapshot.json").read_text())
    pages = {p.stem for p in (WEB / "docs").glob("*.md")}
    assert pages == set(nodes)
    for node_id in nodes:
        assert (WEB / "docs" / f"{node_id}.md").read_text().startswith(f"# {nodes[node_id]['display_name']}")
