"""Provenance from a hidden prompt graph (pure data: runs without ComfyUI)."""

from instance_unlearn.nodes.provenance import from_graph


def graph():
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3.5_medium.safetensors"}},
        "2": {"class_type": "PrimitiveInt", "inputs": {"value": 1234}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": ["2", 0], "steps": 28, "cfg": 4.5,
                                                   "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["5", 0]}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": "vae.safetensors"}},
        "9": {"class_type": "InstanceUnlearn_MarkUndesired", "inputs": {"images": ["4", 0]}},
    }  # fmt: skip


def test_walks_from_the_image_to_sampler_and_loader():
    result = from_graph(graph(), "9")
    assert result["seed"] == 1234 and result["steps"] == 28 and result["cfg"] == 4.5
    assert result["sampler_name"] == "euler" and result["scheduler"] == "sgm_uniform"
    assert result["model"] == "sd3.5_medium.safetensors" and result["sampler_node"] == "3"


def test_unknown_sources_give_little_or_nothing():
    assert from_graph(None, "9") == {}
    assert from_graph(graph(), "77") == {}
    loose = {"9": {"class_type": "InstanceUnlearn_MarkUndesired", "inputs": {"images": ["8", 0]}},
             "8": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}  # fmt: skip
    assert from_graph(loose, "9") == {"source_node": "8", "source_class": "LoadImage"}
    cyclic = {"9": {"class_type": "M", "inputs": {"images": ["8", 0]}}, "8": {"class_type": "A", "inputs": {"x": ["8", 0]}}}
    assert "seed" not in from_graph(cyclic, "9")
