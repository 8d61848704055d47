"""The benchmark scripts still run (a few steps each); their numbers are printed, never asserted."""

import json
import math
import os

import pytest
from conftest import load_benchmark

from unlearn_core import UnlearnConfig
from unlearn_core.demo.run import DemoSettings


@pytest.fixture
def speed():
    return load_benchmark("speed")


def test_speed_benchmark_writes_one_row_per_model(speed, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed.main(["--models", "tiny-sd3", "--steps", "1", "--repeats", "2", "--skip-demo", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["model"] == "tiny-sd3" and len(row["ratios"]) == 2
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("plain_step_s", "unlearn_step_s", "ratio", "two_pass_ratio"))
    assert row["plain_saved_mb"] > 0 and result["demo_training"] is None
    assert "| tiny-sd3 | 8 | 8 |" in capsys.readouterr().out


def test_demo_training_is_timed_with_the_demo_settings(speed):
    config = UnlearnConfig(steps=2, learning_rate=1e-3, lora_rank=2, forget_batch_size=2, remember_batch_size=3)
    timed = speed.demo_training_seconds(DemoSettings(config=config))
    assert (timed["steps"], timed["forget_batch"], timed["remember_batch"], timed["rank"]) == (2, 2, 3, 2)
    assert timed["seconds"] > 0


def test_weight_profile_writes_both_halves_per_noise_level(tmp_path):
    load_benchmark("effectiveness")  # weight_profile imports it, as it does beside it in benchmarks/
    weight_profile = load_benchmark("weight_profile")
    out = tmp_path / "profile.json"
    assert weight_profile.main(["--models", "shapes", "--draws", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]["shapes"]["rows"]
    assert set(rows) == {"x0/full", "x0/complement", "native/full", "native/complement"}
    for row in rows.values():
        assert len(row["forget_grad_norm"]) == len(weight_profile.T_GRID) and 0 <= row["forget_share_below_0.5"] <= 1


def test_effectiveness_rule_chooses_sweep_rates_and_defaults_as_written():
    bench = load_benchmark("effectiveness")
    # point 3, a setting: among entries that forget every sweep target, the best SSIM; else the
    # lowest similarity
    trials = {1e-3: {"forgets_all": False, "ssim": 0.99, "similarity": 0.95},
              3e-3: {"forgets_all": True, "ssim": 0.80, "similarity": 0.5},
              1e-2: {"forgets_all": True, "ssim": 0.70, "similarity": 0.2}}  # fmt: skip
    assert bench.best(trials) == 3e-3
    assert bench.best({k: {**t, "forgets_all": False} for k, t in trials.items()}) == 1e-2
    assert bench.best({1e-3: {"diverged": True}}) is None
    # point 3, a rate: the lowest forgetting rate has no margin, so the next one up is chosen
    assert bench.best_rate(trials) == 1e-2
    assert bench.best_rate({**trials, 3e-2: {"forgets_all": True, "ssim": 0.9, "similarity": 0.1}}) == 3e-2
    assert bench.best_rate({k: {**t, "forgets_all": False} for k, t in trials.items()}) == 1e-2
    assert bench.best_rate({1e-3: {"diverged": True}}) is None


def test_effectiveness_sweep_grows_the_grid_down_while_its_lowest_rate_forgets(monkeypatch):
    bench = load_benchmark("effectiveness")
    ran = []

    def fake_run(name, lr, target, steps):  # forgets from 1e-4 up; SSIM falls with the rate
        ran.append(lr)
        return {"forgotten": lr >= 1e-4 * 0.999, "ssim": 1 - lr, "copy_similarity": 0.5, "psnr": 30.0, "frechet": 0.1}

    fake = type("FakeBench", (), {"run": staticmethod(fake_run)})()
    rate, trials, complete = bench.sweep(fake, "ours", [(0, 1)], steps=5)
    assert complete and sorted(trials)[0] < 1e-4  # went below the lowest forgetting rate to find its edge
    assert math.isclose(rate, 3e-4)  # 1e-4 forgets but nothing below it does: the next rate up

    # point 5: forget on both models first, then the smallest shortfall on the worse model
    def table(per_name):
        return {"sweeps": {n: {"learning_rate": lr, "complete": True,
                               "trials": {f"{lr:g}": {"forgets_all": f, "ssim": s, "similarity": 0.1}}}
                           for n, (lr, f, s) in per_name.items()}}  # fmt: skip

    names = list(bench.OURS_CANDIDATES)[:3]
    tables = {
        "flags": table({names[0]: (1e-3, True, 0.95), names[1]: (3e-3, True, 0.90), names[2]: (1e-3, True, 0.99)}),
        "shapes": table({names[0]: (1e-3, True, 0.60), names[1]: (1e-3, True, 0.70), names[2]: (1e-2, False, 0.90)}),
    }
    defaults = bench.choose_defaults(tables)
    assert names[2] not in defaults["candidates"] or "shortfall" not in defaults["candidates"][names[2]]
    # names[0] falls 0.10 short on shapes; names[1] 0.05 short on flags: the smaller worst case wins
    assert defaults["chosen"] == names[1]
    assert defaults["learning_rate"] == 3e-3
    tables["shapes"]["sweeps"][names[1]]["complete"] = False  # a sweep still running chooses nothing
    assert bench.choose_defaults(tables)["chosen"] == names[0]


def test_the_verified_defaults_rule_forgets_first_then_robustly_to_its_resolution_then_integrity():
    load_benchmark("effectiveness")  # verified_stopping imports it, as it does beside it in benchmarks/
    verified = load_benchmark("verified_stopping")
    a, b, c, d = verified.CANDIDATES[:4]

    def row(forgotten, robust, ssim, runs=12):
        return {"summary": {"runs": runs, "forgotten_fraction": forgotten, "robust_forgotten_fraction": robust / runs,
                            "ssim": {"mean": ssim}}}  # fmt: skip

    models = {
        "one": {"rows": {a: row(1, 12, 0.90), b: row(1, 11, 0.95), c: row(1, 9, 0.99), d: row(11 / 12, 12, 0.99)}},
        "two": {"rows": {a: row(1, 12, 0.80), b: row(1, 12, 0.79), c: row(1, 12, 0.99), d: row(1, 12, 0.99)}},
    }
    chosen = verified.choose_default(models)
    assert d not in chosen["forget_every_target"]  # one run left its target: out first, whatever its integrity
    assert c not in chosen["robust_within_resolution"]  # three runs fewer robust than the best on "one"
    # b is one run short on "one" (within the resolution) and falls 0.01 short on "two"; a 0.05 on "one"
    assert chosen["chosen"] == b
    models["one"]["rows"][b] = row(1, 10, 0.95)  # two runs short: beyond the resolution
    assert verified.choose_default(models)["chosen"] == a
    del models["two"]["rows"][a]  # a candidate without a row on every model is not one: the best robust is now b's 10
    without_a = verified.choose_default(models)
    assert a not in without_a["candidates"] and without_a["chosen"] == c


def test_gpu_size_benchmark_runs_at_the_tiny_size_on_the_cpu(speed, tmp_path, capsys):
    """The GPU benchmark's smoke run: every trainer and checkpointing setting gives a row."""
    gpu_size = load_benchmark("gpu_size")  # imports speed, as it does beside it in benchmarks/
    out = tmp_path / "gpu_size.json"
    assert gpu_size.main(["--sizes", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    trainers = ["ours (diffusers)", "plain peft LoRA"]
    if os.environ.get("COMFYUI_PATH"):  # then the node and the stock TrainLoraNode run inside ComfyUI too
        trainers += ["ComfyUI: Instance Unlearn LoRA", "ComfyUI: TrainLoraNode"]
    assert {(r["trainer"], r["checkpointing"]) for r in rows} == {  # ComfyUI's run each trainer twice, interleaved
        (trainer, checkpointing) for trainer in trainers for checkpointing in (False, True)
    }, rows
    assert all(r["batch"] == 2 and math.isfinite(r["seconds_per_step"]) and r["peak_mb"] is None for r in rows)
    assert "| tiny | ours (diffusers) | on | 2 |" in capsys.readouterr().out


def test_memory_estimate_counts_on_the_meta_device_what_a_real_forward_pass_saves(speed, tmp_path, capsys):
    load_benchmark("gpu_size")  # memory_estimate imports it (and it speed), as beside them in benchmarks/
    estimate = load_benchmark("memory_estimate")
    families = ("tiny", "tiny-flux", "tiny-qwen-image")  # SD3, Flux.1 and Qwen-Image, each built as at full size
    for name in families:
        tiny, saved = estimate.SIZES[name], {}
        for checkpointing in (False, True):
            meta = estimate.count(tiny, 2, checkpointing, device="meta")
            real = estimate.count(tiny, 2, checkpointing, device="cpu")
            assert meta["parameters"] == real["parameters"] and meta["lora_parameters"] == real["lora_parameters"]
            # within 1%: a few small tensors (hundreds of bytes) are laid out differently on the meta device
            assert real["saved_bytes"] > 0 and math.isclose(meta["saved_bytes"], real["saved_bytes"], rel_tol=0.01), (
                name, meta["saved_bytes"], real["saved_bytes"])  # fmt: skip
            saved[checkpointing] = meta["saved_bytes"]
        # checkpointing keeps only block inputs; twice the batch saves twice the activations (but for
        # what a pass computes once whatever its batch, such as Flux's RoPE table)
        assert saved[True] < saved[False]
        doubled = estimate.count(tiny, 4, False)["saved_bytes"] / saved[False]
        assert doubled == 2 if name == "tiny" else math.isclose(doubled, 2, rel_tol=0.02), (name, doubled)
    out = tmp_path / "memory.json"
    assert estimate.main(["--sizes", *families, "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    gpus = {"12 GB", "16 GB", "24 GB", "32 GB", "48 GB", "80 GB"}
    assert written["kind"].startswith("estimate") and set(written["fits"]) == gpus
    assert list(written["models"]) == list(families)
    for name, model in written["models"].items():
        assert model["parameters"] > model["lora_parameters"] > 0 and model["image_tokens"] == 16, name
        assert math.isclose(model["weights_gib"]["bf16"], 2 * model["weights_gib"]["fp8"])
        for weights in ("bf16", "fp8"):
            peaks = model["peak_gib"][weights]
            assert set(peaks["on"]) == set(peaks["off"]) == {"8", "4", "2"}
            assert peaks["on"]["2"] < peaks["off"]["2"] and peaks["on"]["2"] < peaks["on"]["8"]
            assert set(model["fits"]) == gpus and model["smallest_gpu_gb"][weights] == 12  # a tiny model fits anywhere
    capsys.readouterr()
    assert estimate.main(["--json", str(out), "--table"]) == 0  # the README's table, from the JSON alone
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(families) and table[2].startswith("| tiny SD3 |") and table[3].startswith("| tiny Flux |")
    assert table[2].endswith("| 12 GB / 12 GB |"), table


def test_memory_estimate_puts_the_lora_where_the_pack_trains_each_family(speed):
    """Flux.1: both streams' attention projections in the double blocks, linear1 (q, k, v and
    proj_mlp) and linear2 (proj_out) in the single blocks, but not the model's final proj_out;
    SD3 and Qwen-Image: every attention projection of both streams."""
    load_benchmark("gpu_size")
    estimate = load_benchmark("memory_estimate")
    attention = [f"attn.{t}" for t in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]

    def layers(name):
        return set(estimate.count(estimate.SIZES[name], 1, False)["lora_layers"])

    assert layers("tiny-flux") == {f"transformer_blocks.0.{t}" for t in attention} | {
        f"single_transformer_blocks.{i}.{t}" for i in range(2) for t in single}  # fmt: skip
    assert layers("tiny-qwen-image") == {f"transformer_blocks.{i}.{t}" for i in range(2) for t in attention}
    # SD3's last block updates only the image stream: it has no to_add_out
    assert layers("tiny") == {f"transformer_blocks.{i}.{t}" for i in range(2) for t in attention} - {
        "transformer_blocks.1.attn.to_add_out"}  # fmt: skip
    # at full size every single block's linear2, by its full name
    flux = estimate.lora_targets(estimate.SIZES["flux1-dev"])
    assert {t for t in flux if t.endswith("proj_out")} == {f"single_transformer_blocks.{i}.proj_out" for i in range(38)}


def test_effectiveness_run_keys_move_only_with_what_changes_a_run(tmp_path):
    """A record is found again by its key: "auto" on the CPU is float32 and AdamW is what every
    run used before the option, so neither moves a key; a different dtype or optimizer does."""
    from dataclasses import replace

    import torch

    bench = load_benchmark("effectiveness")
    setup = type("Setup", (), {"name": "shapes", "model": torch.nn.Linear(1, 1), "check_steps": None})()
    runs = bench.Bench(setup, tmp_path, UnlearnConfig(steps=5), 5, None)
    neggrad = bench.SETTINGS["neggrad"]  # no surrogate: the key needs no sampling

    def key(**options):
        runs.base = replace(UnlearnConfig(steps=5, remember_target="data"), **options)  # the records' remember target
        return runs.key(neggrad, 1e-3, (0, 3), 0, 5)

    assert key() == key(dtype="float32") == key(optimizer="adamw")
    assert len({key(), key(dtype="bfloat16"), key(optimizer="adamw_8bit"), key(steps=6)}) == 4
    # without the forgetting check every step trains, as before verified stopping: its options move nothing ...
    assert key() == key(stop_when_forgotten=False) == key(check_every=3) == key(repair_when_forgotten=False)
    assert key() != key(remember_target="base")  # ... but a different remember target does
    runs.verified = True  # with the check they are part of what the run did
    assert len({key(), key(stop_when_forgotten=False), key(check_every=3)}) == 3


def test_adaptive_balance_controllers_set_the_cap_as_written():
    """The two controllers the adaptive benchmark measures: ``regenerate`` doubles the cap ratio
    at a check where the regenerated target has not moved, and holds it once it has; ``progress``
    leaves the forget gradient unbounded until the prediction has moved towards the surrogate."""
    import torch

    load_benchmark("effectiveness")
    adaptive = load_benchmark("adaptive_balance")
    from unlearn_core.diffusion.process import RectifiedFlow
    from unlearn_core.method.trainer import make_objective

    base = make_objective(UnlearnConfig(surgery="none"), RectifiedFlow())
    forget, remember = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])
    moved = iter([0.0, 0.1, 0.9, 0.2])  # checks at steps 1, 11, 21, 31
    regenerate = adaptive.Controlled(base, "regenerate", {"rho0": 0.1, "every": 10, "moved": 0.5}, lambda: next(moved))
    ratios = []
    for _ in range(31):
        update, stats = regenerate.combine(forget, remember)
        ratios.append(stats["forget_scale"] * 3.0)  # the capped forget norm over ||g_r|| = 1
    assert ratios[0] == pytest.approx(0.1) and ratios[10] == pytest.approx(0.2)
    assert ratios[20] == pytest.approx(0.2) and ratios[30] == pytest.approx(0.4)
    assert update.tolist() == pytest.approx([0.4, 1.0])

    progress = adaptive.Controlled(base, "progress", {"start": 0.75, "ratio": 0.1, "smoothing": 0.0}, None)
    progress.progress = 0.5
    assert progress.combine(forget, remember)[0].tolist() == [3.0, 1.0]  # not yet: unbounded
    progress.progress = 0.8
    assert progress.combine(forget, remember)[0].tolist() == pytest.approx([0.1, 1.0])  # held at 0.1 ||g_r||


def test_adaptive_balance_table_reads_the_main_rows_by_their_run_keys(tmp_path, monkeypatch):
    """The table's rows of ours and SISS are the effectiveness benchmark's own runs, found by the
    keys its report lists; other methods' main rows stay out."""
    import json
    from types import SimpleNamespace

    load_benchmark("effectiveness")
    adaptive = load_benchmark("adaptive_balance")
    monkeypatch.setattr(adaptive, "RESULTS", tmp_path)

    def run(key, seed, ssim):
        return {"key": key, "seed": seed, "forgotten": ssim > 0.5, "robust": {"forgotten": True}, "ssim": ssim}

    records = {"a": run("a", 0, 0.9), "b": run("b", 1, 0.8), "c": run("c", 0, 0.4), "d": run("d", 0, 0.1)}
    main = {name: {"name": name, "learning_rate": lr, "runs": keys}
            for name, lr, keys in (("ours", 3e-3, ["a", "b"]), ("siss_0.1", 1e-3, ["c"]), ("neggrad", 3e-4, ["d"]))}  # fmt: skip
    (tmp_path / "effectiveness_toy.json").write_text(json.dumps({"main": main}))
    rows = adaptive.table_rows("toy", None, [], SimpleNamespace(records=records), tmp_path)
    assert list(rows) == ["ours @ 0.003 (main row)", "siss_0.1 @ 0.001 (main row)"]
    ours = rows["ours @ 0.003 (main row)"]
    assert ours["summary"]["ssim"]["mean"] == pytest.approx(0.85) and ours["ssim_seed_spread"] == pytest.approx(0.05)
    assert rows["siss_0.1 @ 0.001 (main row)"]["summary"]["forgotten_fraction"] == 0.0


@pytest.fixture
def lshapes():
    """The effectiveness benchmark and an lshapes setup over the untrained VAE and a one-block
    transformer of the same input and conditioning (quick to sample)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from unlearn_core.demo import models as dm

    bench = load_benchmark("effectiveness")
    visible = load_benchmark("visible_models")  # the lshapes setup imports it, as beside it in benchmarks/
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=dm.TEXT_DIM,
                                        caption_projection_dim=16, pooled_projection_dim=dm.POOLED_DIM, pos_embed_max_size=8)  # fmt: skip
    latent = visible.LatentModel(transformer.eval().requires_grad_(False), visible.lshapes_process(),
                                 visible.build_lshapes_vae().eval().requires_grad_(False), 0.5)  # fmt: skip
    return bench, latent, bench.LShapesSetup(latent)


def test_pixel_setups_judge_their_samples_and_lshapes_its_decoded_latents(lshapes, tmp_path):
    """Everything the benchmark compares is an image: a pixel model's samples as they are, the
    latent model's decoded by its VAE (the forgetting check's regenerations too)."""
    import torch

    from unlearn_core.verify.metrics import copy_similarity, to_unit

    bench, latent, setup = lshapes
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    assert bench.ShapesSetup.to_images(None, pixels) is pixels  # the pixel setups share Setup's identity
    assert all(cls.to_images is bench.Setup.to_images for name, cls in bench.SETUPS.items() if name != "lshapes")
    latents = torch.randn(2, 4, 8, 8) * 0.3
    images = setup.to_images(latents)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    assert torch.equal(images, latent.decode(latents))
    expected = float(copy_similarity(setup.detector, to_unit(images[:1]), to_unit(images[1:]))[0])
    assert bench.similarity_to(setup, latents[:1], latents[1:]) == pytest.approx(expected)
    check = bench.Bench(setup, tmp_path, UnlearnConfig(steps=2), 4, None, verified=True).check_settings(4)
    assert torch.equal(check.to_images(latents), to_unit(latent.decode(latents.clamp(-1, 1))))
    pixel_check = bench.Bench(bench.ShapesSetup(), tmp_path, UnlearnConfig(steps=2), 4, None, verified=True).check_settings(4)
    assert torch.equal(pixel_check.to_images(pixels * 2), to_unit((pixels * 2).clamp(-1, 1)))  # as before the hook


def test_lshapes_run_trains_in_latent_space_and_is_judged_on_decoded_images(lshapes, tmp_path):
    """A verified run end to end: surrogate, training and check on latents; the record's figures
    from decoded images."""
    import torch

    from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
    from unlearn_core.data.sets import ForgetTargets
    from unlearn_core.method.stopping import sampler_check

    bench, latent, setup = lshapes
    judged = []
    to_images = setup.to_images
    setup.to_images = lambda samples: judged.append(tuple(samples.shape[1:])) or to_images(samples)
    setup.remember_pairs = lambda label: [(label, 10_000), (label, 10_001), (0, 20_000), (2, 20_000)]  # fewer: quicker
    setup.integrity_pairs = lambda target: [(s % 3, 50_000 + s) for s in range(8)]
    config = UnlearnConfig(steps=2, lora_rank=2, forget_batch_size=1, remember_batch_size=2, check_every=1, seed=0)
    runs = bench.Bench(setup, tmp_path, config, 4, None, verified=True)
    record = runs.run("ours", 1e-3, (1, 1))  # the edit surrogate: SDEdit in latent space, judged decoded
    assert record["steps_taken"] >= 1 and all(math.isfinite(record[k]) for k in ("ssim", "psnr", "frechet", "copy_similarity"))
    assert set(judged) == {(4, 8, 8)}  # the surrogate's copy check and the figures decoded latents
    target = setup.generate([(1, 1)])
    forget = ForgetTargets(target, target, setup.cond([1]), torch.randn(1, 4, 8, 8))
    check = sampler_check(DiffusersDenoiser(setup.model, setup.process), setup.process, forget, runs.check_settings(4), 0.05, 1)
    assert check.targets.shape == (1, 3, 32, 32)  # the check embeds the decoded target


def test_the_family_table_reads_each_familys_outcome_from_the_test_run(tmp_path):
    """benchmarks/families.py reports what the ComfyUI family test found: a pass with the test's
    recorded properties, a skip with its reason; a family that did not run is not called tested."""
    families = load_benchmark("families")
    record = {"model_class": "Flux", "model_type": "FLUX", "file_layers": 6, "patched_by_stock_loader": 6, "tiny_widths": False}
    xml = tmp_path / "run.xml"
    xml.write_text(
        "<testsuites><testsuite>"
        '<testcase name="test_a_family_trains_saves_and_loads_with_every_key[flux]" time="1.25"><properties>'
        f'<property name="family" value="{json.dumps(record).replace(chr(34), "&quot;")}"/></properties></testcase>'
        '<testcase name="test_a_family_trains_saves_and_loads_with_every_key[z_image]" time="0.01">'
        '<skipped message="this ComfyUI has no z_image network to build: no rope_theta"/></testcase>'
        '<testcase name="test_a_family_trains_saves_and_loads_with_every_key[sd3]" time="2"><failure message="boom"/></testcase>'
        "</testsuite></testsuites>"
    )
    rows = families.families(xml)
    assert rows["flux"] == {"seconds": 1.2, "outcome": "passed", **record}
    assert rows["flux"]["file_layers"] == 6 and rows["z_image"]["outcome"] == "skipped" and rows["sd3"]["outcome"] == "failed"
    text = families.table([{"comfyui": {"version": "9.9"}, "families": rows}])
    assert "| Flux.1 dev | Flux (FLUX) | Load Diffusion Model | 6 / 6 | passed |" in text
    assert "| Z-Image / Lumina 2 | - | Load Diffusion Model | - | skipped: this ComfyUI has no z_image network to build |" in text
    assert "| SD3 / SD3.5 | - | Load Checkpoint | - | failed |" in text and "| SDXL | - | Load Checkpoint | - | not run |" in text


@pytest.mark.slow
def test_the_sequential_benchmark_runs_one_request_each_way(tmp_path, capsys):
    """The three ways and the relearning probe on one flags request (records in a temporary folder)."""
    load_benchmark("effectiveness")  # sequential imports it, as it does beside it in benchmarks/
    sequential = load_benchmark("sequential")
    out = tmp_path / "sequential.json"
    assert sequential.main(["--requests", "1", "--relearn-steps", "1", "--threads", "2", "--records", str(tmp_path),
                            "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert [len(result["judged"][way]) for way in ("line", "stack", "joint")] == [1, 1, 1]
    line, stack = result["judged"]["line"][0], result["judged"]["stack"][0]
    assert line["ssim"] == stack["ssim"]  # one request: the line is the request alone
    assert set(result["relearn"]) == {"line", "stack", "joint"} and result["relearn_steps"] == 1
    assert all(0 <= r["came_back"] <= r["forgotten_before"] <= 1 for r in result["relearn"].values())
    assert "| 1 | 1/1 |" in capsys.readouterr().out or not line["all_forgotten"]
