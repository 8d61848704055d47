"""The pack inside a real ComfyUI server: registration, schema contract, one full prompt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

NODE_IDS = ("InstanceUnlearn_MarkUndesired", "InstanceUnlearn_BuildSurrogate", "InstanceUnlearn_TrainLoRA",
            "InstanceUnlearn_PreserveCheck")  # fmt: skip
SNAPSHOT = Path(__file__).with_name("schema_snapshot.json")


def schema_of(info: dict) -> dict:
    inputs = info["input"]
    return {
        "display_name": info["display_name"],
        "category": info["category"],
        "required": sorted(inputs.get("required", {})),
        "optional": sorted(inputs.get("optional", {})),
        "outputs": list(info["output"]),
        "output_names": list(info["output_name"]),
    }


def test_the_workflows_example_input_is_installed_and_served(server):
    """The inpaint workflow's LoadImage names undesired_with_mask.png: the pack copies it into the
    input folder on load (the server's own image listing then offers it)."""
    shipped = Path(__file__).resolve().parents[2] / "workflows" / "input" / "undesired_with_mask.png"
    status, body = server.request("GET", "/view?filename=undesired_with_mask.png&type=input")
    assert status == 200 and body == shipped.read_bytes()
    assert "undesired_with_mask.png" in server.get("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]


def test_object_info_lists_the_four_nodes_with_documented_inputs(server):
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} not registered:\n{server.log_text()[-2000:]}"
        node = info[node_id]
        assert node["description"] and node["category"].startswith("unlearn/")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(node["output_tooltips"]), f"{node_id} has an output without a tooltip"
    current = {node_id: schema_of(info[node_id]) for node_id in NODE_IDS}
    expected = json.loads(SNAPSHOT.read_text())
    if os.environ.get("UPDATE_SCHEMA_SNAPSHOT"):  # a deliberate addition: the checks below still refuse a removal
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
    # Node ids and input names are a contract with saved workflows: never rename; add only.
    for node_id, schema in expected.items():
        assert node_id in current, f"node id {node_id} disappeared"
        for key in ("required", "optional", "outputs"):
            missing = set(schema[key]) - set(current[node_id][key])
            assert not missing, f"{node_id}: {key} {sorted(missing)} were removed or renamed"
    assert current == expected or os.environ.get("UPDATE_SCHEMA_SNAPSHOT"), (
        "schema changed: if the change is an addition, rerun with UPDATE_SCHEMA_SNAPSHOT=1 to update schema_snapshot.json")


def full_prompt(lora_name: str) -> dict:
    train = dict(steps=3, learning_rate=1e-3, rank=4, forget_batch_size=2, remember_batch_size=2, remember_count=2,
                 remember_steps=2, weighting="power", gamma=1.0, surgery="project_forget", method="surrogate", seed=0,
                 dtype="float32", gradient_checkpointing=False, lora_name=lora_name)  # fmt: skip
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UnlearnTest_Conditioning", "inputs": {"seed": 0}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["5", 0],
                                                   "latent_image": ["3", 0], "seed": 11, "steps": 3, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_sd3_vae.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["6", 0]}},
        "8": {"class_type": "InstanceUnlearn_MarkUndesired", "inputs": {"images": ["7", 0], "latent": ["4", 0],
                                                                        "conditioning": ["2", 0], "forget_set": "server",
                                                                        "indices": "1"}},
        "9": {"class_type": "InstanceUnlearn_BuildSurrogate", "inputs": {"model": ["1", 0], "vae": ["6", 0],
                                                                         "targets": ["8", 0], "method": "sdedit",
                                                                         "strength": 0.6, "seed": 0, "steps": 4, "cfg": 2.0,
                                                                         "sampler_name": "euler", "scheduler": "sgm_uniform",
                                                                         "noise_std": 0.1}},
        "10": {"class_type": "InstanceUnlearn_TrainLoRA", "inputs": {"model": ["1", 0], "targets": ["9", 0], **train}},
        "11": {"class_type": "InstanceUnlearn_PreserveCheck", "inputs": {"base_model": ["1", 0], "unlearned_model": ["10", 0],
                                                                         "vae": ["6", 0], "targets": ["9", 0],
                                                                         "preserve_seeds": 1, "steps": 3,
                                                                         "forget_threshold": 0.7, "integrity_threshold": 0.85,
                                                                         "lora_name": ["10", 3]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "unlearn_check"}},
    }  # fmt: skip


def test_the_four_nodes_run_end_to_end_in_one_prompt(server):
    result = server.run_prompt(full_prompt("server/flag_fix"))
    assert result["status"]["status_str"] == "success", json.dumps(result["status"], indent=1)[-3000:]
    lora = server.base / "models" / "loras" / "server" / "flag_fix.safetensors"
    report = lora.with_name("flag_fix.report.json")
    assert lora.is_file() and report.is_file()
    assert json.loads(report.read_text())["targets"][0]["seed"] == 11
    manifest = server.base / "output" / "unlearn" / "forget_sets" / "server" / "manifest.json"
    assert len(json.loads(manifest.read_text())["targets"]) == 1
    assert any(p.name.startswith("unlearn_check") for p in (server.base / "output").iterdir())
