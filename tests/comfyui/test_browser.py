"""The pack in ComfyUI's real frontend, in headless Chromium (marker `browser`).

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -m browser tests/comfyui

Needs Playwright's Python package in ComfyUI's venv (`pip install playwright`; its browser download
is not needed) and a Chromium (Debian: `apt-get install chromium`, or set CHROMIUM_PATH).
Screenshots go to out/browser/ (or UNLEARN_BROWSER_ARTIFACTS).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time

import pytest
from workflow_check import FILE_INPUTS, load_snapshot, load_workflows, widgets

from .conftest import COMFYUI_PATH

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

if not COMFYUI_PATH:
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the browser tests", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="install Playwright into ComfyUI's Python (pip install playwright) to run the browser tests"
)

from . import browser  # noqa: E402 - after the skips: only meaningful with Playwright

CHROMIUM = browser.chromium_path()
if CHROMIUM is None:
    pytest.skip("install Chromium (Debian: apt-get install chromium) or set CHROMIUM_PATH", allow_module_level=True)

WORKFLOWS = load_workflows()
# The nodes that load a model file: on the test server those files are empty stand-ins.
MODEL_LOADERS = {node_type for node_type, inputs in FILE_INPUTS.items() if set(inputs.values()) != {"input"}}
SETTING = "InstanceUnlearn.DefaultForgetSet"
# The widget values of the pack's nodes in the loaded graph, by node id and widget name.
PACK_WIDGET_VALUES = """() => Object.fromEntries(app.graph.nodes.filter((n) => n.type.startsWith("InstanceUnlearn_"))
  .map((n) => [String(n.id), Object.fromEntries((n.widgets || []).filter((w) => w.serialize !== false)
    .map((w) => [w.name, w.value]))]))"""


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def page(chromium, comfy_server, request):
    context = chromium.new_context(viewport=browser.VIEWPORT)
    page = context.new_page()
    page_errors = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.on("console", lambda m: page_errors.append(m.text) if m.type == "error" and "instance_unlearn" in m.text else None)
    browser.open_app(page, comfy_server.url)
    browser.use_renderer(page, "classic")  # settings persist on the server between tests
    yield page
    browser.screenshot(page, f"last-{request.node.name}")
    context.close()
    ours = [e for e in page_errors if "instance_unlearn" in e or "unlearn" in e.lower()]
    assert not ours, f"errors from this pack's extension: {ours}"


def tiny_generation(prefix: str, batch: int = 1) -> dict:
    """The tiny SD3 on the test server: conditioning from the fixture pack, 64 px, 3 steps."""
    return {
        "nodes": [
            {"key": "unet", "type": "UNETLoader", "pos": [0, 0], "widgets": {"unet_name": "tiny_sd3.safetensors"}},
            {"key": "cond", "type": "UnlearnTest_Conditioning", "pos": [0, 160], "widgets": {"seed": 0, "control_after_generate": "fixed"}},
            {"key": "zero", "type": "ConditioningZeroOut", "pos": [0, 320]},
            {"key": "latent", "type": "EmptySD3LatentImage", "pos": [0, 420], "widgets": {"width": 64, "height": 64, "batch_size": batch}},
            {"key": "sampler", "type": "KSampler", "pos": [360, 0],
             "widgets": {"seed": 11, "control_after_generate": "fixed", "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "sgm_uniform"}},
            {"key": "vae", "type": "VAELoader", "pos": [360, 360], "widgets": {"vae_name": "tiny_sd3_vae.safetensors"}},
            {"key": "decode", "type": "VAEDecode", "pos": [720, 0]},
            {"key": "save", "type": "SaveImage", "pos": [720, 120], "size": [320, 340], "widgets": {"filename_prefix": prefix}},
        ],
        "links": [["unet", "MODEL", "sampler", "model"], ["cond", 0, "sampler", "positive"], ["cond", 0, "zero", "conditioning"],
                  ["zero", 0, "sampler", "negative"], ["latent", 0, "sampler", "latent_image"], ["sampler", 0, "decode", "samples"],
                  ["vae", 0, "decode", "vae"], ["decode", 0, "save", "images"]],
    }  # fmt: skip


def tiny_training(forget_set: str, steps: int, lora_name: str) -> dict:
    """Generate, mark image 0, SDEdit surrogate, train: the pipeline on the tiny model."""
    spec = tiny_generation("browser_train")
    spec["nodes"] = [n for n in spec["nodes"] if n["key"] != "save"] + [
        {"key": "mark", "type": "InstanceUnlearn_MarkUndesired", "pos": [720, 120], "widgets": {"forget_set": forget_set, "indices": "0"}},
        {"key": "surrogate", "type": "InstanceUnlearn_BuildSurrogate", "pos": [1080, 0],
         "widgets": {"strength": 0.6, "steps": 4, "cfg": 2.0, "control_after_generate": "fixed"}},
        {"key": "train", "type": "InstanceUnlearn_TrainLoRA", "pos": [1440, 0], "size": [340, 0],
         "widgets": {"steps": steps, "learning_rate": 1e-3, "rank": 4, "forget_batch_size": 2, "remember_batch_size": 2,
                     "remember_count": 2, "remember_steps": 2, "control_after_generate": "fixed", "lora_name": lora_name}},
        {"key": "saved", "type": "PreviewAny", "pos": [1840, 0]},
    ]
    spec["links"] = [link for link in spec["links"] if link[2] != "save"] + [
        ["decode", 0, "mark", "images"], ["sampler", 0, "mark", "latent"], ["cond", 0, "mark", "conditioning"],
        ["unet", "MODEL", "surrogate", "model"], ["vae", 0, "surrogate", "vae"], ["mark", "targets", "surrogate", "targets"],
        ["unet", "MODEL", "train", "model"], ["surrogate", "targets", "train", "targets"], ["train", "lora_name", "saved", "source"],
    ]  # fmt: skip
    return spec


@pytest.mark.parametrize("renderer", sorted(browser.RENDERERS))
@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_loads_without_missing_nodes_and_its_prompt_validates(page, comfy_server, name, renderer):
    browser.use_renderer(page, renderer)
    browser.load_graph(page, WORKFLOWS[name])
    problems = page.evaluate(browser.LOAD_PROBLEMS)
    assert problems == {"unknown_types": [], "flagged_nodes": [], "error_overlay": [], "dialogs": [], "error_toasts": []}
    assert page.evaluate("() => app.graph.nodes.length") == len(WORKFLOWS[name]["nodes"])
    # saved values land in the widgets they were saved from; widgets added since keep their defaults
    definitions, new_widgets = load_snapshot(), 0
    for node_id, values in page.evaluate(PACK_WIDGET_VALUES).items():
        saved = next(n for n in WORKFLOWS[name]["nodes"] if str(n["id"]) == node_id)
        assert {k: values[k] for k in saved["widgets_values_named"]} == saved["widgets_values_named"], saved["type"]
        specs = {**definitions[saved["type"]]["input"]["required"], **definitions[saved["type"]]["input"].get("optional", {})}
        added = {k: v for k, v in values.items() if k not in saved["widgets_values_named"]}
        assert set(added) == {w.name for w in widgets(definitions[saved["type"]])} - set(saved["widgets_values_named"])
        assert added == {k: specs[k][1]["default"] for k in added}, saved["type"]
        new_widgets += len(added)
    if any(n["type"] == "InstanceUnlearn_TrainLoRA" and len(n["widgets_values"]) < len(widgets(definitions[n["type"]]))
           for n in WORKFLOWS[name]["nodes"]):  # fmt: skip
        assert new_widgets > 0, "the training inputs added since the workflow was saved are missing"
    graph_area = page.evaluate(browser.FIT_VIEW)
    page.wait_for_timeout(300)
    browser.screenshot(page, f"workflow-{name.removesuffix('.json')}-{renderer}", graph_area)

    # The prompt the frontend would queue passes ComfyUI's validation. The model files on this
    # server are empty stand-ins, so the run then stops at the first model loader; only that may fail.
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    status, body = comfy_server.request("POST", "/prompt", {"prompt": prompt, "client_id": "workflow-validation"})
    answer = json.loads(body)
    assert status == 200 and not answer.get("node_errors"), json.dumps(answer, indent=1)[:3000]
    prompt_id = answer["prompt_id"]
    entry = browser.wait_for_history(comfy_server, lambda pid, _: pid == prompt_id)
    failed = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert all(m["node_type"] in MODEL_LOADERS for m in failed), failed
    browser.wait_until_idle(comfy_server)


def test_the_load_check_sees_a_missing_node(page):
    workflow = copy.deepcopy(WORKFLOWS["instance_unlearn_sd35.json"])
    next(n for n in workflow["nodes"] if n["type"] == "KSampler")["type"] = "NoSuchSampler"
    browser.load_graph(page, workflow)
    problems = page.evaluate(browser.LOAD_PROBLEMS)
    assert problems["unknown_types"] == ["NoSuchSampler"]
    assert problems["dialogs"] or problems["error_overlay"] or problems["error_toasts"], problems
    browser.screenshot(page, "missing-node-is-detected")


@pytest.mark.parametrize("renderer", sorted(browser.RENDERERS))
def test_mark_as_undesired_from_the_image_context_menu(page, comfy_server, renderer):
    forget_set = f"from_browser_{renderer}"
    browser.use_renderer(page, renderer)
    page.evaluate("([id, value]) => app.extensionManager.setting.set(id, value)", [SETTING, forget_set])
    ids = browser.build_graph(page, tiny_generation(f"browser_mark_{renderer}"))
    browser.queue_with_run_button(page)
    save = ids["save"]
    page.wait_for_function(f"() => app.graph.getNodeById({save}).imgs?.length === 1", timeout=180_000)
    page.wait_for_timeout(500)

    rect = page.evaluate(browser.NODE_RECT, save)
    page.mouse.click(rect["x"] + rect["width"] / 2, rect["y"] + rect["height"] * 0.65, button="right")
    entry = page.get_by_text("Mark as undesired", exact=True)
    entry.wait_for(timeout=10_000)
    browser.screenshot(page, f"mark-context-menu-{renderer}", browser.union(rect, page.evaluate(browser.MENU_RECT, "Mark as undesired")))
    entry.click()
    name_field = page.locator(".prompt-dialog-content input")
    name_field.wait_for(timeout=10_000)
    assert name_field.input_value() == forget_set, "the dialog suggests the default forget set from the settings"
    browser.screenshot(page, f"mark-dialog-{renderer}")
    name_field.press("Enter")
    toast = page.locator(".p-toast-message-success", has_text=f'Added to forget set "{forget_set}"')
    toast.wait_for(timeout=30_000)
    browser.screenshot(page, f"mark-toast-{renderer}")

    manifest = comfy_server.base / "output" / "unlearn" / "forget_sets" / forget_set / "manifest.json"
    targets = json.loads(manifest.read_text())["targets"]
    assert len(targets) == 1
    assert targets[0]["provenance"] == {"source": "context menu", "filename": f"browser_mark_{renderer}_00001_.png",
                                        "subfolder": "", "type": "output"}  # fmt: skip

    # The Mark Undesired Output node loads that set by name (no images connected).
    ids = browser.build_graph(page, {
        "nodes": [{"key": "mark", "type": "InstanceUnlearn_MarkUndesired", "pos": [0, 0], "widgets": {"forget_set": forget_set}},
                  {"key": "preview", "type": "PreviewImage", "pos": [380, 0], "size": [300, 300]}],
        "links": [["mark", "marked", "preview", "images"]],
    })  # fmt: skip
    browser.queue_with_run_button(page)
    page.wait_for_function(f"() => app.graph.getNodeById({ids['preview']}).imgs?.length === 1", timeout=120_000)
    entry = browser.wait_for_history(comfy_server, lambda _, e: any(
        n.get("class_type") == "InstanceUnlearn_MarkUndesired" and n["inputs"].get("forget_set") == forget_set
        for n in e["prompt"][2].values()))  # fmt: skip
    assert entry["status"]["status_str"] == "success"
    browser.screenshot(page, f"mark-set-loaded-by-node-{renderer}")


# The page rectangles of a node's images (Nodes 2.0: its <img> elements), in batch order.
IMAGE_RECTS = """(id) => [...document.querySelector(`[data-node-id="${id}"]`).querySelectorAll("img")]
  .map((img) => { const r = img.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height,
                                                                 src: img.src}; })"""


# The classic canvas: a page point in the node's empty margin left of grid cell ``index`` (the
# cells' rectangles are relative to the node, as the frontend last drew them).
BESIDE_IMAGE = """([id, index]) => {
  const node = app.graph.getNodeById(id);
  const left = Math.min(...node.imageRects.map((r) => r[0]));
  if (left < 6) throw new Error(`the grid fills the node's width (margin ${left}): no empty part beside it`);
  const cell = node.imageRects[index];
  return app.canvasPosToClientPos([node.pos[0] + left / 2, node.pos[1] + cell[1] + cell[3] / 2]);
}"""


@pytest.mark.parametrize("renderer", sorted(browser.RENDERERS))
def test_mark_as_undesired_marks_the_image_under_the_cursor_in_a_batch_grid(page, comfy_server, renderer):
    forget_set = f"grid_{renderer}"
    browser.use_renderer(page, renderer)
    page.evaluate("([id, value]) => app.extensionManager.setting.set(id, value)", [SETTING, forget_set])
    ids = browser.build_graph(page, tiny_generation(f"browser_grid_{renderer}", batch=4))
    browser.queue_with_run_button(page)
    save = ids["save"]
    page.wait_for_function(f"() => (app.nodeOutputs?.['{save}']?.images ?? []).length === 4", timeout=180_000)
    page.wait_for_timeout(1000)
    wanted = 2  # the third image of the batch
    if renderer == "nodes_2":
        page.wait_for_function(f"() => document.querySelectorAll('[data-node-id=\"{save}\"] img').length === 4")
        cells = page.evaluate(IMAGE_RECTS, save)
        cell = cells[wanted]
        point = (cell["x"] + cell["width"] / 2, cell["y"] + cell["height"] / 2)
        page.mouse.move(*point)
    else:  # the classic canvas: find the grid cell of image 2 by hovering until the node reports it
        rect = page.evaluate(browser.NODE_RECT, save)
        point = None
        for fy in (0.35, 0.5, 0.65, 0.8, 0.9):
            for fx in (0.15, 0.35, 0.5, 0.65, 0.85):
                candidate = (rect["x"] + rect["width"] * fx, rect["y"] + rect["height"] * fy)
                page.mouse.move(*candidate)
                page.wait_for_timeout(50)
                if page.evaluate(f"() => app.graph.getNodeById({save}).overIndex") == wanted:
                    point = candidate
                    break
            if point:
                break
        assert point, "no grid cell of the classic node reports image 2 under the cursor"
    page.mouse.click(*point, button="right")
    entry = page.get_by_text("Mark as undesired", exact=True)
    entry.wait_for(timeout=10_000)
    browser.screenshot(page, f"mark-batch-grid-{renderer}", browser.union(page.evaluate(browser.NODE_RECT, save),
                                                                          page.evaluate(browser.MENU_RECT, "Mark as undesired")))  # fmt: skip
    entry.click()
    page.locator(".prompt-dialog-content input").press("Enter")
    page.locator(".p-toast-message-success", has_text=f'Added to forget set "{forget_set}"').wait_for(timeout=30_000)
    manifest = comfy_server.base / "output" / "unlearn" / "forget_sets" / forget_set / "manifest.json"
    targets = json.loads(manifest.read_text())["targets"]
    assert [t["provenance"]["filename"] for t in targets] == [f"browser_grid_{renderer}_{wanted + 1:05d}_.png"]

    # Beside the images there is no image to mark, also on one direct right-click right after the
    # mark (the pointer jumps there from image 2 without hovering across the node on the way).
    page.keyboard.press("Escape")
    if renderer == "nodes_2":  # the node's title
        title = page.evaluate(browser.NODE_RECT, save)
        beside = (title["x"] + 30, title["y"] + 12)
    else:  # the empty margin left of image 2
        beside = page.evaluate(BESIDE_IMAGE, [save, wanted])
    page.mouse.click(*beside, button="right")
    page.wait_for_timeout(800)
    page.wait_for_function("() => document.querySelectorAll('.litemenu-entry, [role=menuitem]').length > 0", timeout=10_000)
    entries = page.evaluate("""() => [...document.querySelectorAll(".litemenu-entry, [role=menuitem]")]
      .map((e) => e.textContent.trim())""")  # fmt: skip
    browser.screenshot(page, f"mark-batch-grid-beside-{renderer}")
    assert entries and "Mark as undesired" not in entries, entries  # the node's menu opened, without the entry
    page.keyboard.press("Escape")


# Records the chart after each progress event (listeners run in order: the chart's own first).
RECORD_CHART = """async () => {
  const { api } = await import("/scripts/api.js");
  window.unlearnChartLog = [];
  api.addEventListener("unlearn.progress", () => {
    const chart = document.querySelector("canvas.unlearn-loss-chart");
    window.unlearnChartLog.push({step: chart.dataset.step, status: chart.dataset.status,
                                 label: chart.getAttribute("aria-label"), drawing: chart.toDataURL()});
  });
}"""


@pytest.mark.parametrize("renderer", sorted(browser.RENDERERS))
def test_loss_chart_updates_during_training(page, comfy_server, renderer):
    steps = 24
    browser.use_renderer(page, renderer)
    ids = browser.build_graph(page, tiny_training(f"chart_{renderer}", steps, f"browser/chart_{renderer}"))
    train = ids["train"]
    chart = page.locator("canvas.unlearn-loss-chart")
    assert chart.get_attribute("aria-label") == "Loss chart: waiting for training"
    page.evaluate(RECORD_CHART)
    browser.queue_with_run_button(page)

    mid_training_shot = None
    deadline = time.time() + 600
    while time.time() < deadline:
        step, status = page.evaluate("() => { const c = document.querySelector('canvas.unlearn-loss-chart'); return [c.dataset.step, c.dataset.status] }")
        if mid_training_shot is None and status == "running" and int(step) >= steps // 2:
            mid_training_shot = browser.screenshot(page, f"loss-chart-mid-training-{renderer}", page.evaluate(browser.NODE_RECT, train))
        if status in ("done", "failed"):
            break
        time.sleep(0.1)
    assert status == "done", f"training did not finish ({status}):\n{comfy_server.log_text()[-2000:]}"
    browser.screenshot(page, f"loss-chart-done-{renderer}", page.evaluate(browser.NODE_RECT, train))

    # What the chart showed after each event: its step, status, label and drawing.
    shown = page.evaluate("() => window.unlearnChartLog")
    running = [entry for entry in shown if entry["status"] == "running"]
    assert [entry["step"] for entry in running] == [str(step) for step in range(steps + 1)]
    for entry in running:
        assert re.fullmatch(rf"Loss chart: step {entry['step']}/{steps}(  ETA \d+ (s|min \d+ s))?", entry["label"]), entry["label"]
    drawings = {hashlib.sha1(entry["drawing"].encode()).hexdigest() for entry in running}
    assert len(drawings) > steps // 2, "the chart is redrawn as the losses arrive"
    # ... and when done, the steps taken and what verified stopping said (this graph connects no VAE)
    assert shown[-1]["status"] == "done" and shown[-1]["label"] == (
        f"Loss chart: done: {steps}/{steps} steps (unavailable: no forgetting check was given, so every step was trained)")
    assert (comfy_server.base / "models" / "loras" / "browser" / f"chart_{renderer}.safetensors").is_file()
