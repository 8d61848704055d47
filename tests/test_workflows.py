"""The shared workflows fit the node definitions (committed snapshot; no ComfyUI needed).

tests/comfyui/test_workflows_live.py checks the same workflows against a live server's
/object_info and that the snapshot still matches it; tests/comfyui/test_browser.py loads them in
the real frontend.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from workflow_check import (
    FILE_INPUTS,
    FRONTEND_NODES,
    ROOT,
    check_workflow,
    load_snapshot,
    load_workflows,
    used_node_types,
)

WORKFLOWS = load_workflows()
PACK_NODES = json.loads((ROOT / "tests" / "comfyui" / "schema_snapshot.json").read_text())
# The usual SD3.5 file names (ComfyUI's SD3.5 examples): the README says where to get them.
SD35_FILES = {
    ("checkpoints", "sd3.5_medium.safetensors"),
    ("text_encoders", "clip_l.safetensors"),
    ("text_encoders", "clip_g.safetensors"),
    ("text_encoders", "t5xxl_fp16.safetensors"),
}
JOBS = {  # workflow -> what it must contain
    "instance_unlearn_sd35.json": {"InstanceUnlearn_MarkUndesired", "InstanceUnlearn_BuildSurrogate",
                                   "InstanceUnlearn_TrainLoRA", "InstanceUnlearn_PreserveCheck", "KSampler"},
    "instance_unlearn_sd35_inpaint.json": {"InstanceUnlearn_MarkUndesired", "LoadImage", "InstanceUnlearn_BuildSurrogate",
                                           "InstanceUnlearn_TrainLoRA"},
    "apply_unlearn_lora_sd35.json": {"LoraLoaderModelOnly", "KSampler", "SaveImage"},
    "instance_unlearn_sd35_several_targets.json": {"InstanceUnlearn_MarkUndesired", "InstanceUnlearn_TrainLoRA"},
}  # fmt: skip


def widget_value(workflow: dict, node_type: str, name: str):
    node = next(n for n in workflow["nodes"] if n["type"] == node_type)
    return node["widgets_values_named"][name]


def test_every_job_has_its_workflow():
    assert set(WORKFLOWS) == set(JOBS)
    for name, needed in JOBS.items():
        assert needed <= {n["type"] for n in WORKFLOWS[name]["nodes"]}, name


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_fits_the_node_definitions(name):
    report = check_workflow(WORKFLOWS[name], load_snapshot())
    assert report.problems == []
    assert report.notes, "each workflow explains what to set in Note nodes"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_is_in_the_frontends_save_format(name):
    workflow = WORKFLOWS[name]
    assert workflow["version"] == 0.4 and isinstance(workflow["groups"], list) and workflow["groups"]
    assert workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for node in workflow["nodes"]:
        assert {"id", "type", "pos", "size", "mode", "inputs", "outputs", "properties"} <= set(node), node["type"]
        assert node["mode"] == 0, f"node {node['id']} is muted or bypassed: ship every node active"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_has_no_null_fields_that_older_frontends_reject(name):
    """Frontend 1.27's schema alerts on floatingLinks, definitions or extra.reroutes set to null
    (COMFYUI.md): such fields are left out or given their empty value."""
    workflow = WORKFLOWS[name]
    nulls = [key for key, value in workflow.items() if value is None]
    nulls += [f"extra.{key}" for key, value in workflow.get("extra", {}).items() if value is None]
    assert not nulls, f"{name}: null fields {nulls}"


def test_workflows_use_the_usual_sd35_files():
    snapshot = load_snapshot()
    for name, workflow in WORKFLOWS.items():
        files = {(folder, value) for _, folder, value in check_workflow(workflow, snapshot).files}
        models = {entry for entry in files if entry[0] in ("checkpoints", "text_encoders")}
        assert models == SD35_FILES, name
    assert widget_value(WORKFLOWS["apply_unlearn_lora_sd35.json"], "LoraLoaderModelOnly", "lora_name") == (
        widget_value(WORKFLOWS["instance_unlearn_sd35.json"], "InstanceUnlearn_TrainLoRA", "lora_name") + ".safetensors"
    ), "the apply workflow loads the LoRA the pipeline saves"


def test_the_triple_clip_loader_gets_clip_l_clip_g_t5_in_this_order():
    for workflow in WORKFLOWS.values():
        loader = next(n for n in workflow["nodes"] if n["type"] == "TripleCLIPLoader")
        assert loader["widgets_values"] == ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"]


def test_inpaint_and_several_targets_variants_are_set_up_for_their_job():
    inpaint = WORKFLOWS["instance_unlearn_sd35_inpaint.json"]
    assert widget_value(inpaint, "InstanceUnlearn_BuildSurrogate", "method") == "inpaint"
    mark = next(n for n in inpaint["nodes"] if n["type"] == "InstanceUnlearn_MarkUndesired")
    mask_slot = next(s for s in mark["inputs"] if s["name"] == "mask")
    link = next(link for link in inpaint["links"] if link[0] == mask_slot["link"])
    assert next(n for n in inpaint["nodes"] if n["id"] == link[1])["type"] == "LoadImage" and link[5] == "MASK"
    several = WORKFLOWS["instance_unlearn_sd35_several_targets.json"]
    assert len(widget_value(several, "InstanceUnlearn_MarkUndesired", "indices").split(",")) > 1
    assert widget_value(several, "EmptySD3LatentImage", "batch_size") > 1


def test_snapshot_holds_exactly_the_node_types_the_workflows_use():
    assert set(load_snapshot()) == used_node_types(WORKFLOWS)


def test_snapshot_agrees_with_the_pack_schema_contract():
    snapshot = load_snapshot()
    for node_id, contract in PACK_NODES.items():
        if node_id not in snapshot:
            continue
        definition = snapshot[node_id]
        assert sorted(definition["input"].get("required", {})) == contract["required"]
        assert sorted(definition["input"].get("optional", {})) == contract["optional"]
        assert definition["output"] == contract["outputs"]


def test_readme_names_every_workflow_and_model_file():
    readme = (ROOT / "README.md").read_text()
    for name in WORKFLOWS:
        assert f"workflows/{name}" in readme, name
    for folder, file_name in SD35_FILES:
        assert file_name in readme and f"models/{folder}" in readme, file_name
    for image in re.findall(r"!\[[^\]]*\]\((docs/[^)]+)\)", readme):
        assert (ROOT / image).is_file(), image


# The checker itself: each kind of mistake is found.
def broken(mutate) -> list[str]:
    workflow = copy.deepcopy(WORKFLOWS["instance_unlearn_sd35.json"])
    mutate(workflow)
    return check_workflow(workflow, load_snapshot()).problems


def node_of(workflow, node_type):
    return next(n for n in workflow["nodes"] if n["type"] == node_type)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w: node_of(w, "KSampler").update(type="KSamplerTypo"), r"unknown node type"),
        (lambda w: node_of(w, "KSampler")["widgets_values"].__setitem__(2, 0), r"steps: 0 is outside \[1, 10000\]"),
        (lambda w: node_of(w, "KSampler")["widgets_values"].__setitem__(4, "eulerish"), r"sampler_name: 'eulerish' is not one of"),
        (lambda w: node_of(w, "KSampler")["widgets_values"].__setitem__(1, "sometimes"), r"control_after_generate"),
        (lambda w: node_of(w, "KSampler")["widgets_values"].pop(), r"6 widget values for 7 widgets"),
        (lambda w: node_of(w, "InstanceUnlearn_TrainLoRA")["widgets_values"].__setitem__(1, "fast"), r"is not a number"),
        (lambda w: w["links"][0].__setitem__(5, "MODEL"), r"typed MODEL but its output is CLIP"),
        (lambda w: [link.__setitem__(1, node_of(w, "EmptySD3LatentImage")["id"]) for link in w["links"] if link[5] == "CLIP"][:1],
         r"EmptySD3LatentImage output LATENT -> CLIPTextEncode.clip \(CLIP\)"),
        (lambda w: node_of(w, "VAEDecode")["inputs"][1].update(link=None), r"not recorded on both|'vae' is not connected"),
    ],
)  # fmt: skip
def test_the_checker_finds_each_kind_of_mistake(mutate, message):
    problems = broken(mutate)
    assert any(re.search(message, p) for p in problems), problems


def test_frontend_only_nodes_and_file_inputs_are_declared_consistently():
    assert set(FRONTEND_NODES) == {"Note", "MarkdownNote"}
    snapshot = load_snapshot()
    for node_type, inputs in FILE_INPUTS.items():
        if node_type in snapshot:
            for name in inputs:
                assert "options" not in snapshot[node_type]["input"]["required"][name][1], "file lists are machine-specific"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_each_workflow_has_a_thumbnail_and_its_input_images(name):
    """ComfyUI's template browser shows <name>.jpg beside <name>.json; the images a workflow's
    loaders name ship in workflows/input/ (the pack installs them into ComfyUI's input folder)."""
    from PIL import Image

    folder = ROOT / "workflows"
    with Image.open(folder / name.replace(".json", ".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128
    inputs = {value for _, kind, value in check_workflow(WORKFLOWS[name], load_snapshot()).files if kind == "input"}
    for image in inputs:
        with Image.open(folder / "input" / image) as shipped:
            assert shipped.mode == "RGBA", f"{image}: LoadImage takes the mask from the alpha channel"
