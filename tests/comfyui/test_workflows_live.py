"""The shared workflows and the web files against a live ComfyUI: its /object_info, the committed
snapshot of it, and the help pages where the frontend looks for them.

The server has a stand-in for every file the workflows name, so file combos are checked like any
other combo here. UPDATE_NODE_DEFINITIONS=1 rewrites tests/comfyui/node_definitions.json from the
live server (after a ComfyUI upgrade, once these tests show the workflows still fit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from workflow_check import (
    check_workflow,
    load_snapshot,
    load_workflows,
    snapshot_host,
    snapshot_of,
    used_node_types,
    write_snapshot,
)

pytestmark = pytest.mark.comfyui

WORKFLOWS = load_workflows()


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_node_definitions_snapshot_matches_live_object_info(object_info, comfy_server):
    node_types = used_node_types(WORKFLOWS)
    missing = sorted(node_types - set(object_info))
    assert not missing, f"this ComfyUI has no {missing}"
    live = snapshot_of(object_info, node_types)
    version = comfy_server.get("/system_stats")["system"]["comfyui_version"]
    if os.environ.get("UPDATE_NODE_DEFINITIONS"):
        write_snapshot(live, version)
    if version != snapshot_host():
        pytest.skip(f"the committed snapshot is ComfyUI {snapshot_host()}'s; on {version} the workflows are checked "
                    "against its live definitions (below) and the pack's nodes against schema_snapshot.json")  # fmt: skip
    committed = load_snapshot()
    changed = sorted(t for t in set(live) | set(committed) if live.get(t) != committed.get(t))
    assert not changed, (
        f"node definitions changed for {changed}: check the workflows against them, then run with "
        "UPDATE_NODE_DEFINITIONS=1 to refresh tests/comfyui/node_definitions.json"
    )


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_fits_the_live_node_definitions(object_info, name):
    report = check_workflow(WORKFLOWS[name], object_info, files="strict")
    assert report.problems == []


def test_help_pages_are_served_where_the_frontend_fetches_them(comfy_server):
    # The frontend asks /extensions/<pack folder>/docs/<node id>.md for a custom node's help.
    nodes = json.loads((Path(__file__).with_name("schema_snapshot.json")).read_text())
    for node_id in nodes:
        status, body = comfy_server.request("GET", f"/extensions/instance_unlearn/docs/{node_id}.md")
        assert status == 200 and body.decode().startswith("# "), node_id
