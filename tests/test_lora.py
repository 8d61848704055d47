import json

import pytest
import torch
from safetensors import safe_open

from unlearn_core.errors import InputError
from unlearn_core.formats.lora import (
    LoraLayer,
    LoraWeights,
    load_lora,
    parse_state_dict,
    save_lora,
    state_dict_for,
    to_diffusers,
    to_mmdit,
)

HIDDEN = 16


def random_sd3_lora(blocks=2, rank=4, seed=0, parts=("to_q", "to_k", "to_v")) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for block in range(blocks):
        names = [f"attn.{p}" for p in parts] + ["attn.add_q_proj", "attn.add_v_proj", "attn.to_out.0", "ff.net.2"]
        for name in names:
            fan_in = 4 * HIDDEN if name == "ff.net.2" else HIDDEN
            layers[f"transformer_blocks.{block}.{name}"] = LoraLayer(
                torch.randn(rank, fan_in, generator=g), torch.randn(HIDDEN, rank, generator=g), alpha=2.0 + block
            )
    return LoraWeights(layers, "diffusers")


def fused_delta(weights: LoraWeights, block: int, stream: str, part: int) -> torch.Tensor:
    delta = weights.layers[f"joint_blocks.{block}.{stream}.attn.qkv"].delta()
    return delta[part * HIDDEN : (part + 1) * HIDDEN]


def test_separate_to_fused_qkv_is_exact_and_block_diagonal():
    separate = random_sd3_lora()
    fused = to_mmdit(separate)
    assert fused.namespace == "mmdit"
    for block in range(2):
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            assert torch.allclose(fused_delta(fused, block, "x_block", part),
                                  separate.layers[f"transformer_blocks.{block}.attn.{name}"].delta(), atol=1e-10)  # fmt: skip
        # context stream: k has no LoRA, so its slice of the fused delta is exactly zero
        assert torch.equal(fused_delta(fused, block, "context_block", 1), torch.zeros(HIDDEN, HIDDEN, dtype=torch.float64))
        assert torch.allclose(fused.layers[f"joint_blocks.{block}.x_block.attn.proj"].delta(),
                              separate.layers[f"transformer_blocks.{block}.attn.to_out.0"].delta())  # fmt: skip
        qkv = fused.layers[f"joint_blocks.{block}.x_block.attn.qkv"]
        assert qkv.rank == 12 and qkv.up.shape == (3 * HIDDEN, 12)
        assert torch.equal(qkv.up[:HIDDEN, 4:], torch.zeros(HIDDEN, 8))  # block diagonal


def test_fused_to_separate_round_trip_gives_identical_deltas():
    separate = random_sd3_lora(parts=("to_q", "to_v"))
    back = to_diffusers(to_mmdit(separate))
    assert set(back.layers) == set(separate.layers)
    for name, layer in separate.layers.items():
        assert back.layers[name].rank == layer.rank  # block-diagonal columns recovered, no rank growth
        assert torch.allclose(back.layers[name].delta(), layer.delta(), atol=1e-10)


def test_a_dense_fused_lora_splits_exactly():
    g = torch.Generator().manual_seed(1)
    fused = LoraWeights({"joint_blocks.0.x_block.attn.qkv": LoraLayer(torch.randn(5, HIDDEN, generator=g),
                                                                      torch.randn(3 * HIDDEN, 5, generator=g), 5.0)},
                        "mmdit")  # fmt: skip
    separate = to_diffusers(fused)
    full = fused.layers["joint_blocks.0.x_block.attn.qkv"].delta()
    for part, name in enumerate(("to_q", "to_k", "to_v")):
        assert torch.allclose(separate.layers[f"transformer_blocks.0.attn.{name}"].delta(),
                              full[part * HIDDEN : (part + 1) * HIDDEN], atol=1e-10)  # fmt: skip


@pytest.mark.parametrize("key_format", ["comfy", "diffusers"])
def test_file_round_trip_keeps_every_delta(tmp_path, key_format):
    weights = random_sd3_lora()
    path = save_lora(tmp_path / "x.safetensors", weights, key_format, {"unlearn.method": "surrogate", "hp": {"lr": 1e-4}})
    loaded = load_lora(path)
    as_separate = to_diffusers(loaded)
    for name, layer in weights.layers.items():
        assert torch.allclose(as_separate.layers[name].delta(), layer.delta(), atol=1e-5)
    assert loaded.metadata["unlearn.method"] == "surrogate"
    assert json.loads(loaded.metadata["hp"]) == {"lr": 1e-4}
    assert loaded.metadata["unlearn.key_format"] == key_format
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if key_format == "comfy":
        assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight" in keys
        assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.alpha" in keys
    else:
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
        assert not any(k.endswith(".alpha") for k in keys)


def test_another_networks_own_names_are_saved_as_they_are():
    """Qwen-Image's ComfyUI module names read like diffusers' SD3 names (transformer_blocks.N.attn.to_q):
    in the 'comfy' namespace they are that network's own and must not become MMDiT's joint blocks."""
    weights = random_sd3_lora(blocks=1)
    tensors = state_dict_for(LoraWeights(weights.layers, "comfy"), "comfy")
    assert {k.removesuffix(".lora_up.weight") for k in tensors if k.endswith(".lora_up.weight")} == {
        f"diffusion_model.{name}" for name in weights.layers
    }


def test_a_file_of_another_networks_own_names_loads_back_in_their_namespace(tmp_path):
    """A file this pack wrote with ComfyUI's keys for such a network loads back as ComfyUI's names: the
    stock loader's tensors again, and summable with a LoRA trained there (a request on an existing LoRA)."""
    from unlearn_core.formats.lora import sum_of

    own = LoraWeights(random_sd3_lora(blocks=1).layers, "comfy")
    loaded = load_lora(save_lora(tmp_path / "qwen.safetensors", own, "comfy"))
    assert loaded.namespace == "comfy"
    again, written = state_dict_for(loaded, "comfy"), state_dict_for(own, "comfy")
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in again)
    assert set(sum_of([loaded, own]).layers) == set(own.layers)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import unlearn_core.formats.lora as lora

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora, "safetensors_bytes", broken)
    target = tmp_path / "y.safetensors"
    with pytest.raises(OSError):
        save_lora(target, random_sd3_lora(), "comfy")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_atomically(tmp_path):
    target = tmp_path / "z.safetensors"
    save_lora(target, random_sd3_lora(seed=1), "comfy")
    save_lora(target, random_sd3_lora(seed=2), "comfy")
    assert [p.name for p in tmp_path.iterdir()] == ["z.safetensors"]
    assert torch.allclose(to_diffusers(load_lora(target)).layers["transformer_blocks.0.attn.to_q"].delta(),
                          random_sd3_lora(seed=2).layers["transformer_blocks.0.attn.to_q"].delta(), atol=1e-5)  # fmt: skip


def test_bad_files_and_keys_are_explained(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_lora(broken)
    with pytest.raises(InputError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="unexpected key"):
        parse_state_dict({"model.weight": torch.zeros(1)})
    with pytest.raises(InputError, match="lacks its up or down"):
        parse_state_dict({"a.lora_A.weight": torch.zeros(1, 2)})
    with pytest.raises(InputError, match="no exact SD3"):
        to_mmdit(LoraWeights({"transformer_blocks.0.norm1.linear": LoraLayer(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}))
    with pytest.raises(InputError, match="unknown LoRA key format"):
        state_dict_for(random_sd3_lora(), "kohya2")


def test_the_sum_of_loras_applies_exactly_what_they_apply_together(tmp_path):
    """Results trained one after another merge into one file whose every delta is the sum of theirs
    (layers only one of them has included), through both key formats."""
    from unlearn_core.formats.lora import sum_of

    first, second = random_sd3_lora(blocks=2, rank=4, seed=1), random_sd3_lora(blocks=1, rank=2, seed=2)
    merged = sum_of([first, second])
    assert set(merged.layers) == set(first.layers) | set(second.layers)
    for name, layer in merged.layers.items():
        expected = first.layers[name].delta() + (second.layers[name].delta() if name in second.layers else 0)
        assert torch.allclose(layer.delta(), expected, atol=1e-5), name
        assert layer.rank == first.layers[name].rank + (second.layers[name].rank if name in second.layers else 0)
    for key_format in ("comfy", "diffusers"):
        loaded = to_diffusers(load_lora(save_lora(tmp_path / f"sum_{key_format}.safetensors", merged, key_format)))
        for name, layer in merged.layers.items():
            assert torch.allclose(loaded.layers[name].delta(), layer.delta(), atol=1e-5), (key_format, name)


def test_loras_of_different_networks_or_formats_are_not_summed():
    from unlearn_core.formats.lora import sum_of

    first = random_sd3_lora(blocks=1)
    with pytest.raises(InputError, match="different networks or in different key formats"):
        sum_of([first, LoraWeights(first.layers, "comfy")])
    wide = random_sd3_lora(blocks=1)
    wide.layers["transformer_blocks.0.attn.to_q"] = LoraLayer(torch.zeros(2, HIDDEN * 2), torch.zeros(HIDDEN, 2), 1.0)
    with pytest.raises(InputError, match="different shapes"):
        sum_of([first, wide])
    with pytest.raises(InputError, match="at least one"):
        sum_of([])
