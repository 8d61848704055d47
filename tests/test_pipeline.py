"""The main job end to end on the embedded flags model (shortened), the CLI, and the provider path."""

import json

import pytest
import torch
from conftest import make_tiny_sd3, sd3_cond
from safetensors.torch import save_file

from unlearn_core import UnlearnConfig, __version__, load_lora
from unlearn_core.cli import main
from unlearn_core.data.seeds import MAX_REMEMBER, preserve_seeds, remember_seeds
from unlearn_core.demo.run import DemoSettings, demo_grid, run_demo
from unlearn_core.formats.files import tensor_hash
from unlearn_core.formats.lora import REPRODUCTION_KEYS

QUICK = dict(seeds_per_class=2, sample_steps=4, remember_same_prompt=4, remember_per_other_class=1, integrity_seeds=8,
             config=UnlearnConfig(steps=3, learning_rate=1e-3, lora_rank=4, forget_batch_size=2, remember_batch_size=2))  # fmt: skip


def test_demo_pipeline_writes_grid_lora_and_reports(tmp_path, monkeypatch):
    from unlearn_core.diffusion.sampling import DenoiserSampler

    generated = []  # (seeds, with LoRA) of every call on the core's sampler, in order

    def recording(self, prompt, seeds, shape):
        with_lora = any("lora" in name for name, _ in self.denoiser.model.named_modules())
        generated.append((list(seeds), with_lora))
        return original(self, prompt, seeds, shape)

    original = DenoiserSampler.generate
    monkeypatch.setattr(DenoiserSampler, "generate", recording)
    steps = []
    report = run_demo(tmp_path, DemoSettings(**QUICK), callback=lambda step, total, m: steps.append(step))
    assert steps == [1, 2, 3]
    # the seed rule: training's remember seeds and the check's held-out seeds come from unlearn_core.data.seeds, disjoint
    target_seed = report["target"]["seed"]
    remember = {seed for seeds, _ in generated[1:-4] for seed in seeds}
    held_out = preserve_seeds(target_seed, QUICK["integrity_seeds"])
    assert generated[1] == (remember_seeds(target_seed, QUICK["remember_same_prompt"]), False)
    assert remember <= set(remember_seeds(target_seed, MAX_REMEMBER)) and not remember & set(held_out)
    assert generated[-4:] == [([target_seed], False), (held_out, False), ([target_seed], True), (held_out, True)]
    # the verdicts are the preserve check's (the node's check), on the base regeneration of the target
    check = report["preserve_check"]
    assert [row["seed"] for row in check["preserve"]] == held_out
    assert check["targets"][0]["reproduced"] is True and check["targets"][0]["ssim_base_to_target"] > 0.99
    assert report["checks"]["forgotten"] == check["summary"]["forgetting_passed"]
    assert report["checks"]["integrity"] == check["summary"]["integrity_passed"]
    assert report["evaluation"]["target_copy_similarity"] == [check["targets"][0]["copy_similarity_unlearned_to_target"]]
    assert report["evaluation"]["integrity_ssim"] == check["summary"]["mean_preserve_ssim"]
    # verified stopping judged the unchanged base model first: it still makes the target from its noise
    verification = report["training"]["verification"]
    assert verification["verifiable"] == [True] and verification["baseline"]["own_similarity"][0] >= 0.9
    assert verification["forgotten_at"] == [None] and "not verified" in verification["status"]  # 3 steps, no check due
    for name in ("grid.png", "report.json", "report.html", "unlearn_lora.safetensors"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["checks"]["base_model_untouched"] is True
    assert 0 <= saved["evaluation"]["integrity_ssim"] <= 1 and len(saved["evaluation"]["target_copy_similarity"]) == 1
    assert saved["passed"] == all(saved["checks"].values()) and report["target"]["seed"] in (0, 1)
    lora = load_lora(tmp_path / "unlearn_lora.safetensors")
    assert lora.metadata["unlearn.method"] == "surrogate" and json.loads(lora.metadata["unlearn.target_hashes"])
    assert set(REPRODUCTION_KEYS) <= set(lora.metadata) and json.loads(lora.metadata["unlearn.demo_settings"])["target"] is None
    assert (tmp_path / "forget_sets" / "demo" / "manifest.json").is_file()
    assert "<img src=\"data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_the_demo_grid_labels_its_columns_and_rows_beside_unmoved_images():
    scale, gap, side = 4, 2, 32
    generator = torch.Generator().manual_seed(0)
    target, surrogate, after_target = (torch.rand(1, 3, side, side, generator=generator) * 2 - 1 for _ in range(3))
    base_others, after_others = (torch.rand(8, 3, side, side, generator=generator) * 2 - 1 for _ in range(2))
    grid = demo_grid(target, surrogate, after_target, base_others, after_others, scale=scale, gap=gap)
    tile, step = side * scale, side * scale + gap
    unlabelled = (3, gap + 3 * step, gap + 8 * step)
    band_top, band_left = grid.shape[1] - unlabelled[1], grid.shape[2] - unlabelled[2]
    assert 8 <= band_top <= 30 and 8 <= band_left <= 80, grid.shape  # a band of one line of small text each

    def at(row, column):  # a tile of the grid, counted from the corner the labels leave
        top, left = band_top + gap + row * step, band_left + gap + column * step
        return grid[:, top : top + tile, left : left + tile]

    def upscaled(image):
        return (image.repeat_interleave(scale, -1).repeat_interleave(scale, -2) + 1) / 2

    for (row, column), image in {(0, 0): target[0], (0, 1): surrogate[0], (0, 2): after_target[0],
                                 (1, 0): base_others[0], (1, 7): base_others[7], (2, 5): after_others[5]}.items():  # fmt: skip
        assert torch.allclose(at(row, column), upscaled(image)), (row, column)

    def inked(region):  # pixels darker than the white background
        return int((region < 0.5).all(dim=0).sum())

    columns = [inked(grid[:, :band_top, band_left + gap + c * step : band_left + gap + c * step + tile]) for c in range(8)]
    assert all(columns[:3]) and not any(columns[3:]), columns  # target | surrogate | after, nothing above the rest
    rows = [inked(grid[:, band_top + gap + r * step : band_top + gap + r * step + tile, :band_left]) for r in range(3)]
    assert rows[0] == 0 and rows[1] and rows[2], rows  # before / after for the other seeds


def test_demo_takes_a_named_target(tmp_path):
    report = run_demo(tmp_path, DemoSettings(**{**QUICK, "target": "ireland:5", "surrogate": "inpaint"}))
    assert report["target"]["prompt"] == "ireland" and report["target"]["seed"] == 5


def quick_cli_demo(monkeypatch, **fixed):
    """Make ``unlearn demo`` run the shortened settings (plus ``fixed``) under its own options."""
    import unlearn_core.demo.run as pipeline

    original = pipeline.DemoSettings
    monkeypatch.setattr(pipeline, "DemoSettings", lambda **kwargs: original(**{**QUICK, **kwargs, **fixed}))


def test_cli_exits_1_when_the_demo_checks_fail(tmp_path, monkeypatch):
    """Exit code 2 (bad input) is covered by the tables in tests/test_bad_inputs.py."""
    quick_cli_demo(monkeypatch, forget_threshold=-1.0)  # an impossible threshold: the demo's check fails -> exit 1
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 1


def test_cli_demo_options_reach_the_training_config(tmp_path, monkeypatch):
    quick_cli_demo(monkeypatch, forget_threshold=2.0, integrity_ssim_min=-1.0)  # checks that always pass
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--gamma", "4"]) == 0
    config = json.loads(load_lora(tmp_path / "unlearn_lora.safetensors").metadata["unlearn.config"])
    assert (config["steps"], config["gamma"]) == (2, 4.0)
    assert config["learning_rate"] == QUICK["config"].learning_rate  # everything else stays the demo's


def test_provider_job_on_a_diffusers_model_folder(tmp_path):
    model = make_tiny_sd3()
    model.save_pretrained(tmp_path / "transformer")
    g = torch.Generator().manual_seed(0)
    targets = torch.rand(1, 4, 8, 8, generator=g) * 2 - 1
    save_file({"targets": targets, **sd3_cond(1)}, str(tmp_path / "targets.safetensors"))
    job = {"model": {"path": "transformer", "kind": "sd3"}, "targets": "targets.safetensors",
           "surrogate": {"method": "sdedit", "strength": 0.5, "steps": 4}, "remember": {"generate": 4, "steps": 4},
           "config": {"steps": 3, "lora_rank": 2, "forget_batch_size": 2, "remember_batch_size": 2},
           "output": "out/forget.safetensors", "key_format": "comfy"}  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["run", str(tmp_path / "job.json")]) == 0
    lora = load_lora(tmp_path / "out" / "forget.safetensors")
    assert lora.namespace == "mmdit" and lora.metadata["unlearn.base_model"] == "transformer"
    # the LoRA records everything that reproduces it ...
    metadata = lora.metadata
    assert set(REPRODUCTION_KEYS) <= set(metadata) and metadata["unlearn.pack_version"] == __version__
    assert json.loads(metadata["unlearn.config"]) == UnlearnConfig.from_dict(job["config"]).to_dict()
    assert json.loads(metadata["unlearn.target_hashes"]) == [tensor_hash(targets[0])]
    assert json.loads(metadata["unlearn.surrogate"]) == {**job["surrogate"], "seed": 0}
    assert json.loads(metadata["unlearn.remember"]) == job["remember"]
    # ... and the same job on the same inputs gives the same bytes
    (tmp_path / "again.json").write_text(json.dumps({**job, "output": "out/again.safetensors"}))
    assert main(["run", str(tmp_path / "again.json")]) == 0
    assert (tmp_path / "out" / "again.safetensors").read_bytes() == (tmp_path / "out" / "forget.safetensors").read_bytes()


@pytest.mark.parametrize(("environment", "argv", "threads"), [
    ({"OMP_NUM_THREADS": "1"}, [], 1),  # the machine's owner limited torch: make demo follows
    ({"OMP_NUM_THREADS": "1"}, ["--threads", "3"], 3),  # the flag wins
    ({}, [], 2),
    ({"OMP_NUM_THREADS": "lots"}, [], 2),
])  # fmt: skip
def test_the_command_line_takes_its_torch_threads_from_omp_num_threads(monkeypatch, tmp_path, environment, argv, threads):
    from unlearn_core import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    used = []
    monkeypatch.setattr(cli, "configure_torch", used.append)
    assert cli.main([*argv, "run", str(tmp_path / "no_such_job.json")]) == 2  # refused after torch is set up
    assert used == [threads]
