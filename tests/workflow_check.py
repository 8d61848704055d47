"""Check a ComfyUI UI-format workflow (what the frontend saves) against node definitions.

The definitions are /object_info entries: live from a server, or the committed snapshot
tests/comfyui/node_definitions.json. A workflow passes when every node type exists, every link
joins an output and an input of matching types, every required input is linked or has a widget
value, and every widget value fits its input (numbers within min/max, combo values among the
options). Combos that list files on the user's machine (models, input images) are checked apart:
their option lists depend on what is installed, so `check_workflow(..., files="collect")` records
their values in `WorkflowReport.files` instead of comparing them with the options.

Widget values are positional, in the order the frontend creates widgets: every widget input in
`input_order` (required, then optional), plus the extra value of the frontend's own widgets: an INT
named seed/noise_seed (or with control_after_generate) gets a "control after generate" combo, an
upload combo gets its upload button. The pack's own nodes only ever add widgets after their older
ones, so a workflow saved before an addition holds fewer values: the frontend fills its values into
the leading widgets and leaves the rest at their defaults. Such a shorter list passes when its
saved names (`widgets_values_named`) are exactly those leading widgets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NODE_DEFINITIONS = ROOT / "tests" / "comfyui" / "node_definitions.json"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
CONTROLLED_NAMES = ("seed", "noise_seed")  # the frontend adds the control combo to these by name
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "mesh_upload", "animated_image_upload")
PACK_PREFIX = "InstanceUnlearn_"  # the pack's node ids: widgets are only ever appended
# Nodes the frontend defines itself (not in /object_info): their widget values.
FRONTEND_NODES = {"Note": ("text",), "MarkdownNote": ("text",)}
# Combos that list files under a models folder (or input/): node type -> input -> folder.
FILE_INPUTS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "TripleCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "VAELoader": {"vae_name": "vae"},
    "LoadImage": {"image": "input"},
    "InstanceUnlearn_TrainLoRA": {"existing_lora": "loras"},
}


@dataclass
class Widget:
    name: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN, COMBO, CONTROL or UPLOAD
    options: dict = field(default_factory=dict)
    choices: list | None = None


@dataclass
class WorkflowReport:
    problems: list[str] = field(default_factory=list)
    files: list[tuple[str, str, str]] = field(default_factory=list)  # (node type, folder, value)
    node_types: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def load_workflows() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(WORKFLOWS.glob("*.json"))}


def load_snapshot() -> dict:
    return json.loads(NODE_DEFINITIONS.read_text())


def input_specs(definition: dict) -> dict[str, list]:
    inputs = definition.get("input", {})
    return {**inputs.get("required", {}), **inputs.get("optional", {})}


def input_order(definition: dict) -> list[str]:
    order = definition.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    inputs = definition.get("input", {})
    return list(inputs.get("required", {})) + list(inputs.get("optional", {}))


def input_type(spec: list) -> str:
    """"COMBO" for both combo spellings (a list of options, or "COMBO" with options)."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def combo_choices(spec: list) -> list:
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1].get("options", []))


def widgets(definition: dict) -> list[Widget]:
    """The widgets the frontend creates for a node definition, in order."""
    result = []
    specs = input_specs(definition)
    for name in input_order(definition):
        spec = specs[name]
        kind = input_type(spec)
        if kind not in WIDGET_TYPES:
            continue
        options = spec[1] if len(spec) > 1 else {}
        if options.get("forceInput"):
            continue
        result.append(Widget(name, kind, options, combo_choices(spec) if kind == "COMBO" else None))
        control = options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in CONTROLLED_NAMES):
            result.append(Widget("control_after_generate", "CONTROL"))
        if kind == "COMBO" and any(options.get(flag) for flag in UPLOAD_FLAGS):
            result.append(Widget("upload", "UPLOAD"))
    return result


def types_match(output_type: str, input_type_: str) -> bool:
    if "*" in (output_type, input_type_):
        return True
    return bool(set(output_type.split(",")) & set(input_type_.split(",")))


def _check_value(widget: Widget, value, where: str, file_input: tuple[str, str] | None, files: str,
                 report: WorkflowReport) -> None:  # fmt: skip
    kind = widget.kind
    if kind == "CONTROL":
        if value not in CONTROL_VALUES:
            report.problems.append(f"{where}: control_after_generate {value!r} is not one of {CONTROL_VALUES}")
        return
    if kind == "UPLOAD":
        return
    if kind == "BOOLEAN":
        if not isinstance(value, bool):
            report.problems.append(f"{where}: {value!r} is not a boolean")
        return
    if kind == "STRING":
        if not isinstance(value, str):
            report.problems.append(f"{where}: {value!r} is not a string")
        return
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            report.problems.append(f"{where}: {value!r} is not {'an integer' if kind == 'INT' else 'a number'}")
            return
        low, high = widget.options.get("min"), widget.options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            report.problems.append(f"{where}: {value} is outside [{low}, {high}]")
        return
    # COMBO
    if file_input is not None and files == "collect":
        if not isinstance(value, str) or not value:
            report.problems.append(f"{where}: file name {value!r} is empty")
        else:
            report.files.append((*file_input, value))
        return
    if value not in widget.choices:
        shown = widget.choices if len(widget.choices) <= 12 else widget.choices[:12] + ["..."]
        report.problems.append(f"{where}: {value!r} is not one of {shown}")


def check_workflow(workflow: dict, definitions: dict, files: str = "collect") -> WorkflowReport:
    """Every problem of a UI-format workflow against node definitions (see the module docstring).

    files="collect": file combos (FILE_INPUTS) are recorded, not compared with their options;
    files="strict": they must be among the options like any combo (a server that has the files).
    """
    report = WorkflowReport()
    for key in ("nodes", "links", "version"):
        if key not in workflow:
            report.problems.append(f"workflow has no '{key}'")
    if report.problems:
        return report
    nodes = {node["id"]: node for node in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        report.problems.append("node ids are not unique")
    links = {}
    for link in workflow["links"]:
        link_id, origin, origin_slot, target, target_slot, link_type = link[:6]
        links[link_id] = link
        if origin not in nodes or target not in nodes:
            report.problems.append(f"link {link_id} joins missing nodes {origin} -> {target}")
            continue
        origin_node, target_node = nodes[origin], nodes[target]
        outputs, inputs = origin_node.get("outputs", []), target_node.get("inputs", [])
        if origin_slot >= len(outputs) or target_slot >= len(inputs):
            report.problems.append(f"link {link_id} uses a missing slot")
            continue
        if inputs[target_slot].get("link") != link_id or link_id not in (outputs[origin_slot].get("links") or []):
            report.problems.append(f"link {link_id} is not recorded on both of its slots")
        origin_def, target_def = definitions.get(origin_node["type"]), definitions.get(target_node["type"])
        if origin_def is None or target_def is None:
            continue  # reported with the node
        if origin_slot >= len(origin_def["output"]):
            report.problems.append(f"link {link_id}: {origin_node['type']} has no output {origin_slot}")
            continue
        output_type = origin_def["output"][origin_slot]
        input_name = inputs[target_slot]["name"]
        spec = input_specs(target_def).get(input_name)
        if spec is None:
            report.problems.append(f"link {link_id}: {target_node['type']} has no input {input_name!r}")
            continue
        wanted = input_type(spec)
        if not types_match(output_type, wanted):
            report.problems.append(f"link {link_id}: {origin_node['type']} output {output_type} -> "
                                   f"{target_node['type']}.{input_name} ({wanted})")  # fmt: skip
        if link_type != output_type and link_type != "*":
            report.problems.append(f"link {link_id} is typed {link_type} but its output is {output_type}")
    for node in workflow["nodes"]:
        _check_node(node, definitions, links, files, report)
    return report


def _check_node(node: dict, definitions: dict, links: dict, files: str, report: WorkflowReport) -> None:
    node_type = node["type"]
    report.node_types.add(node_type)
    where = f"node {node['id']} {node_type}"
    values = node.get("widgets_values", [])
    if node_type in FRONTEND_NODES:
        if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], str) and values[0].strip()):
            report.problems.append(f"{where}: a note needs its text")
        else:
            report.notes.append(values[0])
        return
    definition = definitions.get(node_type)
    if definition is None:
        report.problems.append(f"{where}: unknown node type")
        return
    specs = input_specs(definition)
    node_widgets = widgets(definition)
    linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
    for slot in node.get("inputs", []):
        if slot["name"] not in specs and slot["name"] not in {w.name for w in node_widgets}:
            report.problems.append(f"{where}: input {slot['name']!r} is not in the definition")
        elif slot.get("link") is not None and slot["link"] not in links:
            report.problems.append(f"{where}: input {slot['name']!r} points at missing link {slot['link']}")
    if isinstance(values, dict):
        report.problems.append(f"{where}: widgets_values is a dict (an old format); save the workflow again")
        return
    named = node.get("widgets_values_named")
    if len(values) != len(node_widgets) and not saved_before_additions(node_type, values, named, node_widgets):
        report.problems.append(f"{where}: {len(values)} widget values for {len(node_widgets)} widgets "
                               f"({[w.name for w in node_widgets]})")  # fmt: skip
        return
    for widget, value in zip(node_widgets, values):
        if named is not None and named.get(widget.name, value) != value:
            report.problems.append(f"{where}.{widget.name}: positional {value!r} and named {named[widget.name]!r} differ")
        if widget.name in linked:
            continue  # the link gives the value
        folder = FILE_INPUTS.get(node_type, {}).get(widget.name)
        file_input = None if folder is None else (node_type, folder)
        _check_value(widget, value, f"{where}.{widget.name}", file_input, files, report)
    required = definition.get("input", {}).get("required", {})
    widget_names = {w.name for w in node_widgets}
    for name in required:
        if name not in linked and name not in widget_names:
            report.problems.append(f"{where}: required input {name!r} is not connected")


def saved_before_additions(node_type: str, values: list, named: dict | None, node_widgets: list[Widget]) -> bool:
    """A pack node saved before widgets were appended: fewer values, named after the leading widgets."""
    if not node_type.startswith(PACK_PREFIX) or named is None or len(values) >= len(node_widgets):
        return False
    return list(named) == [w.name for w in node_widgets[: len(values)]]


def normalise_definition(definition: dict, node_type: str) -> dict:
    """What workflow checks depend on, without machine-specific file lists and help texts."""
    file_inputs = FILE_INPUTS.get(node_type, {})
    inputs = {}
    for section in ("required", "optional"):
        entries = {}
        for name, spec in definition.get("input", {}).get(section, {}).items():
            options = {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items() if k not in ("tooltip", "placeholder")}
            kind = spec[0]
            if name in file_inputs:
                kind, options = "COMBO", {k: v for k, v in options.items() if k != "options"}
            elif isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": list(kind)}
            entries[name] = [kind, options]
        if entries:
            inputs[section] = entries
    return {
        "input": inputs,
        "input_order": {k: v for k, v in definition.get("input_order", {}).items() if k in ("required", "optional")},
        "output": list(definition.get("output", [])),
        "output_name": list(definition.get("output_name", [])),
    }


def used_node_types(workflows: dict[str, dict]) -> set[str]:
    return {node["type"] for workflow in workflows.values() for node in workflow["nodes"]} - set(FRONTEND_NODES)


def snapshot_of(object_info: dict, node_types: set[str]) -> dict:
    """The committed snapshot's content: the normalised definitions of ``node_types``."""
    return {node_type: normalise_definition(object_info[node_type], node_type) for node_type in sorted(node_types)}


#: the ComfyUI version the snapshot was taken from (other hosts list other samplers, widgets, ...)
SNAPSHOT_HOST = NODE_DEFINITIONS.with_name("node_definitions.host.json")


def write_snapshot(snapshot: dict, comfyui_version: str) -> None:
    NODE_DEFINITIONS.write_text(json.dumps(snapshot, indent=1, ensure_ascii=False) + "\n")
    SNAPSHOT_HOST.write_text(json.dumps({"comfyui_version": comfyui_version}) + "\n")


def snapshot_host() -> str:
    return json.loads(SNAPSHOT_HOST.read_text())["comfyui_version"]
