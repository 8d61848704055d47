"""Forget sets on disk; bad inputs and damaged sets are rows of tests/test_bad_inputs.py."""

import torch

from unlearn_core.data.forget_set import ForgetSetStore


def image(seed=0, h=16, w=24):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_mark_reload_and_dedupe(tmp_path):
    store = ForgetSetStore(tmp_path)
    latent = torch.randn(4, 2, 3)
    mask = torch.zeros(16, 24)
    mask[2:5, 3:9] = 1
    cond = {"cross_attn": torch.randn(1, 5, 8), "pooled_output": torch.randn(1, 4)}
    record, added = store.add("flags", image(), latent=latent, mask=mask, provenance={"seed": 7}, conditioning=cond)
    assert added and store.names() == ["flags"]
    again, added_again = store.add("flags", image(), provenance={"seed": 99})
    assert not added_again and again.id == record.id and len(store.records("flags")) == 1
    loaded = store.records("flags")[0]
    assert loaded.provenance == {"seed": 7}
    assert torch.allclose(store.load_image("flags", loaded), image(), atol=1 / 255)
    assert torch.equal(store.load_latent("flags", loaded), latent)
    assert torch.equal(store.load_mask("flags", loaded), mask)
    assert torch.equal(store.load_conditioning("flags", loaded)["cross_attn"], cond["cross_attn"])
    store.add("flags", image(1))
    assert len(store.records("flags")) == 2
    assert store.remove("flags", record.id) and len(store.records("flags")) == 1
