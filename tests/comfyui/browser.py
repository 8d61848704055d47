"""Driving ComfyUI's frontend in headless Chromium (Playwright with the system's Chromium).

Graphs are loaded with the app's documented `app.loadGraphData` or built node by node with
LiteGraph (the way a user adds and wires nodes); prompts are queued with the Run button, so the
server's progress events reach this browser like a user's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("UNLEARN_BROWSER_ARTIFACTS") or ROOT / "out" / "browser")
VIEWPORT = {"width": 2400, "height": 1350}
EXTENSIONS = ("unlearn.MarkUndesired", "unlearn.LossChart")


def chromium_path() -> str | None:
    if os.environ.get("CHROMIUM_PATH"):
        return os.environ["CHROMIUM_PATH"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# Builds a graph from {"nodes": [{key, type, pos, widgets, size?, title?}], "links": [[from, output, to, input]]};
# outputs and inputs by name or index. Returns {key: node id}.
BUILD_GRAPH = """(spec) => {
  const graph = app.graph;
  graph.clear();
  const made = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error("unknown node type " + n.type);
    graph.add(node);
    node.pos = [...n.pos];
    if (n.title) node.title = n.title;
    for (const [name, value] of Object.entries(n.widgets ?? {})) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${n.type} has no widget ${name}`);
      widget.value = value;
    }
    const size = node.computeSize();
    node.setSize(n.size ? [Math.max(n.size[0], size[0]), Math.max(n.size[1], size[1])] : size);
    made[n.key] = node;
  }
  const slot = (slots, key) => (typeof key === "number" ? key : slots.findIndex((s) => s.name === key));
  for (const [from, output, to, input] of spec.links) {
    const source = made[from], target = made[to];
    if (!source.connect(slot(source.outputs, output), target, slot(target.inputs, input))) {
      throw new Error(`cannot link ${from}.${output} -> ${to}.${input}`);
    }
  }
  app.canvas.setDirty(true, true);
  return Object.fromEntries(Object.entries(made).map(([key, node]) => [key, node.id]));
}"""

# What the frontend reports after loading a graph: node types it does not know, nodes it flags
# (missing models or inputs), and the error overlay, dialogs and error toasts it shows.
LOAD_PROBLEMS = """() => ({
  unknown_types: app.graph.nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
  flagged_nodes: app.graph.nodes.filter((n) => n.has_errors).map((n) => n.type),
  error_overlay: [...document.querySelectorAll("[data-testid=error-overlay]")].map((e) => e.textContent.trim()),
  dialogs: [...document.querySelectorAll("[role=dialog], .p-dialog")].map((e) => e.textContent.trim().slice(0, 300)),
  error_toasts: [...document.querySelectorAll(".p-toast-message-error, .p-toast-message-warn")].map((e) => e.textContent.trim()),
})"""

# Fits the whole graph into the window; returns its rectangle in page pixels.
FIT_VIEW = """() => {
  const boxes = [...app.graph.nodes.map((n) => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]),
                 ...app.graph.groups.map((g) => [g.pos[0], g.pos[1], g.size[0], g.size[1]])];
  const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
  const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
  app.canvas.ds.fitToBounds([x0 - 30, y0 - 30, x1 - x0 + 60, y1 - y0 + 60]);
  app.canvas.setDirty(true, true);
  const [left, top] = app.canvasPosToClientPos([x0, y0]);
  const [right, bottom] = app.canvasPosToClientPos([x1, y1]);
  return {x: left, y: top, width: right - left, height: bottom - top};
}"""

# The node's rectangle in page pixels (title bar included): its element with Nodes 2.0, else
# from the canvas transform.
NODE_RECT = """(id) => {
  const element = document.querySelector(`[data-node-id="${id}"]`);
  if (app.extensionManager.setting.get("Comfy.VueNodes.Enabled") && element) {
    const r = element.getBoundingClientRect();
    return {x: r.x, y: r.y, width: r.width, height: r.height};
  }
  const node = app.graph.getNodeById(id);
  const [x0, y0] = app.canvasPosToClientPos([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
  const [x1, y1] = app.canvasPosToClientPos([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
  return {x: x0, y: y0, width: x1 - x0, height: y1 - y0};
}"""


# The two ways the frontend draws nodes: the LiteGraph canvas, and Vue components ("Nodes 2.0").
RENDERERS = {"classic": False, "nodes_2": True}


#: the first frontend whose Nodes 2.0 renderer the pack is tested with (it shows output images)
NODES_2_FROM = (1, 49)


def frontend_version(page) -> tuple[int, ...]:
    text = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? '0'")
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def use_renderer(page, renderer: str) -> None:
    """Switch renderer; Nodes 2.0 is skipped on frontends before NODES_2_FROM (1.27's is an early
    preview that draws no output images, so nothing there could be marked)."""
    version = frontend_version(page)
    if RENDERERS[renderer] and version < NODES_2_FROM:
        import pytest

        pytest.skip(f"frontend {'.'.join(map(str, version))} has no Nodes 2.0 renderer with image previews "
                    f"(tested from {'.'.join(map(str, NODES_2_FROM))})")  # fmt: skip
    page.evaluate("(on) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)", RENDERERS[renderer])
    page.wait_for_timeout(500)


# The rectangle (page pixels) of the open context menu that holds ``text``.
MENU_RECT = """(text) => {
  const item = [...document.querySelectorAll(".litemenu-entry, [role=menuitem]")].find((e) => e.textContent.trim() === text);
  const r = (item?.closest(".litecontextmenu, [role=menu]") ?? item).getBoundingClientRect();
  return {x: r.x, y: r.y, width: r.width, height: r.height};
}"""


def union(a: dict, b: dict) -> dict:
    x, y = min(a["x"], b["x"]), min(a["y"], b["y"])
    return {"x": x, "y": y, "width": max(a["x"] + a["width"], b["x"] + b["width"]) - x,
            "height": max(a["y"] + a["height"], b["y"] + b["height"]) - y}  # fmt: skip


def open_app(page, url: str) -> None:
    """Open the frontend and wait until the app and this pack's extensions are set up."""
    page.goto(url)
    names = json.dumps(list(EXTENSIONS))
    page.wait_for_function(f"() => {names}.every((n) => window.app?.extensions?.some((e) => e.name === n)) && !!app.canvas",
                           timeout=90_000)  # fmt: skip
    page.wait_for_timeout(500)


def load_graph(page, workflow: dict) -> None:
    page.evaluate("async (workflow) => { await app.loadGraphData(workflow); }", workflow)
    page.wait_for_timeout(1000)  # toasts and the error overlay appear after the load settles


def build_graph(page, spec: dict) -> dict[str, int]:
    return page.evaluate(BUILD_GRAPH, spec)


def queue_with_run_button(page) -> None:
    page.locator("[data-testid=queue-button]").click()


def screenshot(page, name: str, clip: dict | None = None, margin: int = 24) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if clip is not None:
        clip = {"x": max(clip["x"] - margin, 0), "y": max(clip["y"] - margin, 0),
                "width": clip["width"] + 2 * margin, "height": clip["height"] + 2 * margin}  # fmt: skip
    page.screenshot(path=str(path), clip=clip)
    return path


def wait_for_history(server, predicate, timeout: float = 300) -> dict:
    """The first finished prompt in /history that ``predicate`` accepts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for prompt_id, entry in server.get("/history").items():
            if entry.get("status", {}).get("completed") is not None or entry.get("status", {}).get("status_str") == "error":
                if predicate(prompt_id, entry):
                    return entry
        time.sleep(0.5)
    raise TimeoutError("no matching prompt finished:\n" + server.log_text()[-3000:])


def wait_until_idle(server, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.3)
    raise TimeoutError("the queue did not empty")
