"""A job writes what it trained towards: surrogates, remember set, a preview grid and a report."""

import hashlib
import json

import torch
from conftest import make_tiny_sd3, quick_job, save_targets, sd3_cond
from PIL import Image
from safetensors.torch import load_file

from unlearn_core import load_lora
from unlearn_core.cli import main
from unlearn_core.formats.files import tensor_hash


def test_the_job_writes_its_training_data_preview_and_report_beside_the_lora(tmp_path):
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    cond = sd3_cond(2)
    targets = save_targets(tmp_path / "targets.safetensors", channels=4, cond=cond, n=2)
    (tmp_path / "job.json").write_text(json.dumps(quick_job("transformer", "targets.safetensors", model={"kind": "sd3"})))
    assert main(["run", str(tmp_path / "job.json")]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "forget.preview.png", "forget.report.json", "forget.safetensors", "forget.training.safetensors"]  # fmt: skip

    trained_on = load_file(str(out / "forget.training.safetensors"))
    lora = load_lora(out / "forget.safetensors")
    assert torch.equal(trained_on["targets"], targets)
    assert trained_on["remember"].shape == (3, 4, 8, 8) and trained_on["remember.pooled_projections"].shape == (3, 8)
    assert all(torch.equal(trained_on[key], value) for key, value in cond.items())
    # the surrogates on disk are the ones the LoRA was trained towards
    assert json.loads(lora.metadata["unlearn.surrogate_hashes"]) == [tensor_hash(s) for s in trained_on["surrogates"]]

    with Image.open(out / "forget.preview.png") as preview:  # rows: targets, surrogates, remember (64 px tiles)
        assert preview.size == (2 + 3 * 66, 2 + 3 * 66)
    report = json.loads((out / "forget.report.json").read_text())
    for name, digest in report["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert report["targets_sha256"] == hashlib.sha256((tmp_path / "targets.safetensors").read_bytes()).hexdigest()
    assert set(report["base_model"]["files_sha256"]) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_the_training_file_is_a_targets_file_that_trains_on_the_same_data(tmp_path):
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    save_targets(tmp_path / "targets.safetensors", channels=4, cond=sd3_cond(1))
    first = quick_job("transformer", "targets.safetensors", model={"kind": "sd3"})
    (tmp_path / "first.json").write_text(json.dumps(first))
    assert main(["run", str(tmp_path / "first.json")]) == 0
    again = {**first, "targets": "out/forget.training.safetensors", "output": "again/forget.safetensors"}
    (tmp_path / "again.json").write_text(json.dumps(again))
    assert main(["run", str(tmp_path / "again.json")]) == 0
    a, b = load_lora(tmp_path / "out" / "forget.safetensors"), load_lora(tmp_path / "again" / "forget.safetensors")
    assert a.layers.keys() == b.layers.keys()
    assert all(torch.equal(a.layers[k].up, b.layers[k].up) and torch.equal(a.layers[k].down, b.layers[k].down) for k in a.layers)
    assert b.metadata["unlearn.surrogate"] == "given"
