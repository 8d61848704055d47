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
# Each family's usual model files (ComfyUI's own examples and templates), by the family name the
# workflow files carry: the README says where each goes and where to get it.
FAMILY_FILES = {
    "sd35": {("checkpoints", "sd3.5_medium.safetensors"), ("text_encoders", "clip_l.safetensors"),
             ("text_encoders", "clip_g.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors")},
    "flux1_dev": {("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                  ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")},
    "sdxl": {("checkpoints", "sd_xl_base_1.0.safetensors")},
    "z_image_turbo": {("diffusion_models", "z_image_turbo_bf16.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
                      ("vae", "ae.safetensors")},
}  # fmt: skip
# The text-encoder loader of each family with its widget values: files in the order the loader
# expects them and the CLIP type (SDXL's encoders come from its checkpoint).
TEXT_ENCODERS = {
    "sd35": ("TripleCLIPLoader", ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"]),
    "flux1_dev": ("DualCLIPLoader", ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"]),
    "sdxl": ("CheckpointLoaderSimple", ["sd_xl_base_1.0.safetensors"]),
    "z_image_turbo": ("CLIPLoader", ["qwen_3_4b.safetensors", "lumina2", "default"]),
}
PIPELINE = {"InstanceUnlearn_MarkUndesired", "InstanceUnlearn_BuildSurrogate", "InstanceUnlearn_TrainLoRA",
            "InstanceUnlearn_PreserveCheck", "KSampler"}  # fmt: skip
JOBS = {  # workflow -> what it must contain
    "instance_unlearn_sd35.json": PIPELINE | {"CheckpointLoaderSimple", "TripleCLIPLoader"},
    "instance_unlearn_sd35_inpaint.json": {"InstanceUnlearn_MarkUndesired", "LoadImage", "InstanceUnlearn_BuildSurrogate",
                                           "InstanceUnlearn_TrainLoRA"},
    "apply_unlearn_lora_sd35.json": {"LoraLoaderModelOnly", "KSampler", "SaveImage"},
    "instance_unlearn_sd35_several_targets.json": {"InstanceUnlearn_MarkUndesired", "InstanceUnlearn_TrainLoRA"},
    "instance_unlearn_flux1_dev.json": PIPELINE | {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance"},
    "instance_unlearn_sdxl.json": PIPELINE | {"CheckpointLoaderSimple", "EmptyLatentImage"},
    "instance_unlearn_z_image_turbo.json": PIPELINE | {"UNETLoader", "CLIPLoader", "VAELoader", "ModelSamplingAuraFlow"},
}  # fmt: skip
# The other families' pipelines: their training inputs are the node's defaults, except the LoRA's
# name, the family's sampler steps and what makes training of a 3-12 B model fit a consumer GPU
# (the README's memory estimates: checkpointing on, remember batch 4).
FAMILY_PIPELINES = ("instance_unlearn_flux1_dev.json", "instance_unlearn_sdxl.json", "instance_unlearn_z_image_turbo.json")
MEMORY_SETTINGS = {"gradient_checkpointing": True, "remember_batch_size": 4}


def widget_value(workflow: dict, node_type: str, name: str):
    node = next(n for n in workflow["nodes"] if n["type"] == node_type)
    return node["widgets_values_named"][name]


def family_of(name: str) -> str:
    return next(family for family in FAMILY_FILES if f"_{family}" in name.removesuffix(".json"))


def source(workflow: dict, node: dict, input_name: str) -> tuple[dict, int] | None:
    """The node and output slot that feed ``input_name`` of ``node`` (None: not connected)."""
    link_id = next(slot["link"] for slot in node["inputs"] if slot["name"] == input_name)
    if link_id is None:
        return None
    link = next(link for link in workflow["links"] if link[0] == link_id)
    return next(n for n in workflow["nodes"] if n["id"] == link[1]), link[2]


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
    (docs/COMFYUI.md): such fields are left out or given their empty value."""
    workflow = WORKFLOWS[name]
    nulls = [key for key, value in workflow.items() if value is None]
    nulls += [f"extra.{key}" for key, value in workflow.get("extra", {}).items() if value is None]
    assert not nulls, f"{name}: null fields {nulls}"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_each_workflow_uses_its_familys_usual_files(name):
    files = {(folder, value) for _, folder, value in check_workflow(WORKFLOWS[name], load_snapshot()).files}
    models = {entry for entry in files if entry[0] not in ("input", "loras")}
    assert models == FAMILY_FILES[family_of(name)]


def test_the_apply_workflow_loads_the_lora_the_pipeline_saves():
    assert widget_value(WORKFLOWS["apply_unlearn_lora_sd35.json"], "LoraLoaderModelOnly", "lora_name") == (
        widget_value(WORKFLOWS["instance_unlearn_sd35.json"], "InstanceUnlearn_TrainLoRA", "lora_name") + ".safetensors"
    )


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_the_text_encoders_load_in_their_loaders_order_and_type(name):
    """clip_l, clip_g, t5 for SD3.5; clip_l, t5 as type flux for Flux.1; Qwen3 4B as type lumina2
    for Z-Image; every prompt is encoded by that loader's CLIP."""
    workflow = WORKFLOWS[name]
    loader_type, values = TEXT_ENCODERS[family_of(name)]
    loaders = [n for n in workflow["nodes"] if n["type"] == loader_type]
    assert len(loaders) == 1 and loaders[0]["widgets_values"] == values
    for encoder in (n for n in workflow["nodes"] if n["type"] == "CLIPTextEncode"):
        assert source(workflow, encoder, "clip")[0] is loaders[0], encoder.get("title")


@pytest.mark.parametrize("name", sorted(n for n in WORKFLOWS if PIPELINE <= {node["type"] for node in WORKFLOWS[n]["nodes"]}))
def test_the_pack_nodes_get_what_the_sampler_got(name):
    """Mark Undesired Output records the sampler's own conditioning (Flux.1: after FluxGuidance) and
    negative, and every pack node that samples uses the sampler's model (Z-Image: after
    ModelSamplingAuraFlow) and settings: regenerations replay the generation exactly."""
    workflow = WORKFLOWS[name]
    sampler = node_of(workflow, "KSampler")
    mark = node_of(workflow, "InstanceUnlearn_MarkUndesired")
    assert source(workflow, mark, "conditioning") == source(workflow, sampler, "positive")
    assert source(workflow, mark, "negative") == source(workflow, sampler, "negative")
    assert source(workflow, mark, "latent") == (sampler, 0)
    model = source(workflow, sampler, "model")
    for node_type, input_name in (("InstanceUnlearn_BuildSurrogate", "model"), ("InstanceUnlearn_TrainLoRA", "model"),
                                  ("InstanceUnlearn_PreserveCheck", "base_model")):  # fmt: skip
        assert source(workflow, node_of(workflow, node_type), input_name) == model, node_type
    surrogate = node_of(workflow, "InstanceUnlearn_BuildSurrogate")["widgets_values_named"]
    for setting in ("steps", "cfg", "sampler_name", "scheduler"):
        assert surrogate[setting] == sampler["widgets_values_named"][setting], setting


def test_the_family_workflows_sample_as_comfyuis_own_templates():
    flux, sdxl, z_image = (WORKFLOWS[name] for name in FAMILY_PIPELINES)
    settings = ("steps", "cfg", "sampler_name", "scheduler")
    assert [{k: widget_value(w, "KSampler", k) for k in settings} for w in (flux, sdxl, z_image)] == [
        {"steps": 20, "cfg": 1, "sampler_name": "euler", "scheduler": "simple"},
        {"steps": 25, "cfg": 8, "sampler_name": "euler", "scheduler": "normal"},
        {"steps": 8, "cfg": 1, "sampler_name": "res_multistep", "scheduler": "simple"},
    ]
    # Flux.1 dev: the prompt through FluxGuidance 3.5 into the sampler; the negative zeroed from it
    guidance = node_of(flux, "FluxGuidance")
    assert guidance["widgets_values_named"] == {"guidance": 3.5}
    assert source(flux, guidance, "conditioning")[0]["type"] == "CLIPTextEncode"
    assert source(flux, node_of(flux, "KSampler"), "positive") == (guidance, 0)
    assert source(flux, node_of(flux, "ConditioningZeroOut"), "conditioning") == (guidance, 0)
    assert source(flux, node_of(flux, "KSampler"), "negative") == (node_of(flux, "ConditioningZeroOut"), 0)
    assert source(flux, node_of(flux, "KSampler"), "model")[0]["type"] == "UNETLoader"
    # Z-Image Turbo: the diffusion model through ModelSamplingAuraFlow shift 3 into the sampler
    shift = node_of(z_image, "ModelSamplingAuraFlow")
    assert shift["widgets_values_named"] == {"shift": 3}
    assert source(z_image, shift, "model")[0]["type"] == "UNETLoader"
    assert source(z_image, node_of(z_image, "KSampler"), "model") == (shift, 0)
    # latents at the families' 1024 x 1024, in the latent node each family's template uses
    for workflow, latent_type in ((flux, "EmptySD3LatentImage"), (sdxl, "EmptyLatentImage"), (z_image, "EmptySD3LatentImage")):
        latent = node_of(workflow, latent_type)["widgets_values_named"]
        assert (latent["width"], latent["height"]) == (1024, 1024)
        assert source(workflow, node_of(workflow, "KSampler"), "latent_image")[0]["type"] == latent_type


@pytest.mark.parametrize("name", FAMILY_PIPELINES)
def test_the_family_workflows_train_with_the_nodes_defaults(name):
    definition = load_snapshot()["InstanceUnlearn_TrainLoRA"]
    specs = {**definition["input"]["required"], **definition["input"]["optional"]}
    workflow = WORKFLOWS[name]
    train = node_of(workflow, "InstanceUnlearn_TrainLoRA")["widgets_values_named"]
    assert train["remember_steps"] == widget_value(workflow, "KSampler", "steps")
    assert train["lora_name"] == "unlearn/" + widget_value(workflow, "InstanceUnlearn_MarkUndesired", "forget_set")
    assert train["control_after_generate"] == "fixed", "the same seed gives the same LoRA"
    assert {k: train[k] for k in MEMORY_SETTINGS} == MEMORY_SETTINGS
    others = {k: v for k, v in train.items() if k in specs and k not in ("remember_steps", "lora_name", *MEMORY_SETTINGS)}
    assert others == {k: specs[k][1]["default"] for k in others}, "a training default changed: store it in this workflow too"


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
    for folder, file_name in set().union(*FAMILY_FILES.values()):
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
            definition = snapshot[node_type]["input"]
            for name in inputs:
                spec = definition["required"].get(name) or definition["optional"][name]
                assert "options" not in spec[1], "file lists are machine-specific"


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
