"""Bad inputs to each of the four nodes, in-process in a real ComfyUI, one table per node.

Every row raises an InputError whose message names what was wrong and what to change; the
ComfyUI base folder (output/, models/) is byte-identical afterwards and the cached model is
bit-identical with nothing left on it. The core API and the command line have the same tables
in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from conftest import tree

from .helpers import SIZE, SURROGATE, TRAIN, assert_same_weights, generate, run, snapshot

pytestmark = pytest.mark.comfyui


@dataclass
class Case:
    id: str
    inputs: Callable  # (context) -> the node's inputs
    wrong: str  # regex: the message names what was wrong
    fix: str  # regex: ... and what to change


@pytest.fixture(scope="module")
def context(comfy, loaded, marked, with_surrogates):
    """Inputs the rows build on, and forget sets damaged on disk the way a crash or an edit would."""
    from instance_unlearn.nodes.targets import UnlearnTargets

    latent, images = generate(comfy["nodes"], loaded["model"], loaded["vae"], loaded["conditioning"], seed=3)
    store_root = comfy["base"] / "output" / "unlearn" / "forget_sets"
    record = {"id": "0123456789abcdef", "width": SIZE, "height": SIZE}
    damaged = {
        "damaged_json": "{not json",
        "escaping": json.dumps({"version": 1, "targets": [{**record, "image": "../../../../secret.png"}]}),
        "missing_file": json.dumps({"version": 1, "targets": [{**record, "image": "0123456789abcdef.png"}]}),
    }
    for name, text in damaged.items():
        (store_root / name).mkdir(parents=True, exist_ok=True)
        (store_root / name / "manifest.json").write_text(text)
    unsupported = loaded["model"].clone()
    unsupported.model = type("Cascade", (), {"model_type": None})()
    trained = with_surrogates[0]
    first = trained.targets[0]
    smaller = replace(first, id="small", latent=first.latent[:, :4, :4], surrogate_latent=first.surrogate_latent[:, :4, :4])
    yield {
        "model": loaded["model"], "vae": loaded["vae"], "conditioning": loaded["conditioning"], "unsupported": unsupported,
        "images": images, "latent": latent, "marked": marked, "trained": trained,
        "empty": UnlearnTargets("flags", []),
        "no_conditioning": trained.with_targets([replace(first, conditioning=None)]),
        "small_latent": marked.with_targets([replace(marked.targets[0], latent=marked.targets[0].latent[:, :4, :4])]),
        "mixed_sizes": trained.with_targets([first, smaller]),
        "nan_surrogate": trained.with_targets([replace(first, surrogate_latent=with_value(first.surrogate_latent, 0, float("nan")))]),
    }  # fmt: skip
    for name in damaged:
        for path in (store_root / name).iterdir():
            path.unlink()
        (store_root / name).rmdir()


def with_value(tensor, index, value):
    tensor = tensor.clone()
    tensor.view(-1)[index] = value
    return tensor


def nan_image(images, index=0):
    images = images.clone()
    images[index, 3, 5, 1] = float("nan")
    return images


BAD_NAME = ("is not allowed", "use 1-100 letters, digits")
HOSTILE_NAMES = ["../../escape", "/tmp/absolute", "C:\\evil", "a/../../b", "..", "con", "a|b", "x" * 101, "name\x00.txt"]


def mark(**inputs):
    return lambda c: {"forget_set": "bad_inputs", "indices": "0", **inputs}


def mark_with(**builders):
    return lambda c: {"forget_set": "bad_inputs", "indices": "0", "images": c["images"],
                      **{k: v(c) for k, v in builders.items()}}  # fmt: skip


MARK_CASES = [
    Case("set never marked, no images", mark(forget_set="never_marked"), "forget set 'never_marked' is empty",
         "connect the images to mark"),
    *[Case(f"set name {name!r}", mark_with(forget_set=lambda c, n=name: n), *BAD_NAME)
      for name in ["../escape", "/abs/set", "a/b", "con", "a|b", "", "%2e%2e"]],
    Case("index outside the batch", mark_with(indices=lambda c: "7"), "do not pick images of this batch of 2",
         r"valid: 0\.\.1"),
    Case("index not a number", mark_with(indices=lambda c: "first"), "'first' are not understood", "use e.g. '0', '0,2'"),
    Case("mask of the wrong size", mark_with(mask=lambda c: torch.ones(1, 32, 32)), r"mask \(32, 32\) does not fit the image \(64, 64\)",
         "draw the mask on this image"),
    Case("all-zero mask", mark_with(mask=lambda c: torch.zeros(1, SIZE, SIZE)), r"mask is empty \(all zero\)",
         "paint the undesired region"),
    Case("NaN mask", mark_with(mask=lambda c: with_value(torch.ones(1, SIZE, SIZE), 9, float("nan"))), "NaN/inf",
         "draw the mask again"),
    Case("NaN image", mark_with(images=lambda c: nan_image(c["images"])), "image holds NaN/inf", "regenerate it"),
    Case("second chosen image NaN (nothing of the first is stored)",
         mark_with(images=lambda c: nan_image(c["images"], 1), indices=lambda c: "0,1"), "image holds NaN/inf", "regenerate it"),
    Case("inf latent", mark_with(latent=lambda c: {"samples": with_value(c["latent"]["samples"], 4, float("inf"))}),
         "latent holds NaN/inf", "sample the image again"),
    Case("latent of another batch", mark_with(latent=lambda c: {"samples": c["latent"]["samples"][:1]}),
         r"latent batch \(1\) and the image batch \(2\) differ", "connect the matching latent"),
    Case("latent of another shape", mark_with(latent=lambda c: {"samples": torch.zeros(2, 16, 4, 8)}),
         r"latent \(4x8\) does not belong to these 64x64 images", "connect the sampler's LATENT"),
    Case("damaged manifest", mark(forget_set="damaged_json"), "manifest of forget set 'damaged_json' is damaged",
         "delete .*manifest.json and mark the outputs again"),
    Case("manifest pointing outside its set", mark(forget_set="escaping"), *BAD_NAME),
    Case("manifest listing a missing file", mark(forget_set="missing_file"), "lists 0123456789abcdef.png but the file is missing",
         "mark that output again"),
]  # fmt: skip


def surrogate(targets="marked", **inputs):
    return lambda c: {"model": c["model"], "vae": c["vae"], "targets": c[targets], **SURROGATE,
                      **{k: (v(c) if callable(v) else v) for k, v in inputs.items()}}  # fmt: skip


SURROGATE_CASES = [
    Case("no targets", surrogate("empty"), "no targets", "mark at least one output first"),
    Case("edited_image missing", surrogate(method="edited_image"), r"needs one edited image per target \(1\), got 0",
         "one edited image per target"),
    Case("edited_image of another size", surrogate(method="edited_image", edited_image=lambda c: torch.rand(1, 32, 32, 3)),
         r"edited image 0 is \(32, 32\) but its target is \(64, 64\)", "must have the target's size"),
    Case("NaN edited_image", surrogate(method="edited_image", edited_image=lambda c: torch.full((1, SIZE, SIZE, 3), float("nan"))),
         r"target 0 \(\w+\): the surrogate holds NaN/inf", "check the edited image"),
    Case("latent of another size than its image", surrogate("small_latent"), "has a 4x4 latent but a 64x64 image",
         "mark it again with the sampler's latent"),
    Case("inpaint without a mask", surrogate(method="inpaint"), "needs a mask on every target",
         "connect a mask to Mark Undesired Output"),
    Case("sdedit without conditioning", surrogate("no_conditioning"), "this target has no conditioning",
         "connect the conditioning that produced it"),
    Case("a model type the method cannot handle", surrogate(model=lambda c: c["unsupported"]), "Cascade, type .* is not supported",
         "handles rectified-flow models .* and epsilon/v-prediction"),
]  # fmt: skip


def train(targets="trained", **inputs):
    return lambda c: {"model": c["model"], "targets": c[targets], "lora_name": "tests/bad", **TRAIN,
                      **{k: (v(c) if callable(v) else v) for k, v in inputs.items()}}  # fmt: skip


TRAIN_CASES = [
    Case("empty forget set", train("empty"), "the forget set is empty", "mark at least one output first"),
    Case("targets without surrogates", train("marked"), "target 0 has no surrogate", "connect Build Surrogate"),
    Case("target without conditioning", train("no_conditioning"), "target 0 has no conditioning",
         "connect the conditioning that produced it"),
    Case("targets of different sizes", train("mixed_sizes"), "targets have different latent sizes",
         "unlearn each size in its own run"),
    Case("zero steps", train(steps=0), "steps=0", r"whole number in \[1, .*zero steps would train nothing"),
    Case("learning rate 5", train(learning_rate=5.0), r"learning_rate=5.0 must lie in \(0, 0.1\]", "about 1e-4 to 1e-2"),
    Case("learning rate NaN", train(learning_rate=float("nan")), r"learning_rate=nan must lie in \(0, 0.1\]", "about 1e-4 to 1e-2"),
    Case("target modules that match no layer", train(target_modules="no_such_layer"),
         r"no layer of this model matches the LoRA targets \['no_such_layer'\]", "leave target_modules empty"),
    Case("target modules of only commas", train(target_modules=" , "), "target_modules is empty", "give module names"),
    Case("rank larger than the layer", train(rank=200), "LoRA rank 200 is larger than layer .* allows", "lower the rank"),
    Case("unknown method", train(method="esd"), "method='esd'", "is not one of: .*surrogate"),
    Case("unknown dtype", train(dtype="float8"), "dtype='float8'", "is not one of: .*float32"),
    Case("a model type the method cannot handle", train(model=lambda c: c["unsupported"]), "is not supported",
         "handles rectified-flow models"),
    *[Case(f"LoRA name {name!r}", train(lora_name=name), *BAD_NAME) for name in HOSTILE_NAMES],
    Case("remember latents of another size", train(remember_latents=lambda c: {"samples": torch.zeros(2, 16, 4, 4)}),
         r"remember latents \(16, 4, 4\) and targets \(16, 8, 8\) differ", "generate the remember set at the targets' resolution"),
    Case("NaN remember latents", train(remember_latents=lambda c: {"samples": torch.full((2, 16, 8, 8), float("nan"))}),
         "remember sample holds .* NaN/inf", "regenerate or re-encode"),
    Case("malformed remember conditioning", train(remember_latents=lambda c: {"samples": torch.zeros(2, 16, 8, 8)},
                                                  remember_conditioning="a cat"),
         "CONDITIONING is malformed", "connect the output of a text encode node"),
    Case("NaN surrogate", train("nan_surrogate"), "surrogate holds 1 NaN/inf", "regenerate or re-encode"),
]  # fmt: skip


def check(targets="trained", **inputs):
    return lambda c: {"base_model": c["model"], "unlearned_model": c["model"], "vae": c["vae"], "targets": c[targets],
                      "preserve_seeds": 1, "steps": 2, "forget_threshold": 0.7, "integrity_threshold": 0.85,
                      "lora_name": "", **inputs}  # fmt: skip


CHECK_CASES = [
    Case("no targets", check("empty"), "no targets to check", "mark and unlearn at least one output"),
    Case("target without conditioning", check("no_conditioning"), "target 0 has no conditioning",
         "connect it to Mark Undesired Output"),
    *[Case(f"LoRA name {name!r}", check(lora_name=name), *BAD_NAME) for name in HOSTILE_NAMES[:4]],
    *[Case(f"copy detector {name!r}", check(copy_detector=name), *BAD_NAME) for name in HOSTILE_NAMES[:4]],
    Case("copy detector not in models/unlearn", check(copy_detector="missing.pt"), "copy detector 'missing.pt' is not in",
         "put the SSCD TorchScript file there, or choose pixel"),
]  # fmt: skip

TABLES = {"mark": MARK_CASES, "surrogate": SURROGATE_CASES, "train": TRAIN_CASES, "check": CHECK_CASES}
ROWS = [(node_key, case) for node_key, cases in TABLES.items() for case in cases]


@pytest.mark.parametrize("node_key, case", ROWS, ids=[f"{key}: {case.id}" for key, case in ROWS])
def test_each_node_refuses_bad_input_with_the_fix_and_writes_nothing(comfy, node, context, node_key, case):
    from instance_unlearn.unlearn_core.errors import InputError

    inputs = case.inputs(context)
    files, weights = tree(comfy["base"]), snapshot(context["model"])
    with pytest.raises(InputError) as caught:
        run(node[node_key], **inputs)
    message = str(caught.value)
    assert re.search(case.wrong, message), f"{case.id}: {message!r} does not say what was wrong ({case.wrong})"
    assert re.search(case.fix, message), f"{case.id}: {message!r} does not say what to change ({case.fix})"
    assert tree(comfy["base"]) == files, f"{node_key}: {case.id} wrote or changed files"
    assert_same_weights(context["model"], weights)


def test_a_surrogate_identical_to_its_target_is_refused_by_build_and_warned_of_by_training(comfy, node, context, caplog):
    """Build Surrogate never hands training a copy of its target; a forget set that carries one
    anyway (edited by hand) trains with a warning."""
    from instance_unlearn.nodes.targets import Target
    from instance_unlearn.unlearn_core.errors import InputError

    files, weights = tree(comfy["base"]), snapshot(context["model"])
    with pytest.raises(InputError, match="copy of its target .* edit it more, or use sdedit/inpaint"):
        run(node["surrogate"], **surrogate(method="noise", noise_std=0.0)(context))
    built = context["trained"]
    targets = built.with_targets([Target(**{**t.__dict__, "surrogate_latent": t.latent.clone()}) for t in built.targets])
    with caplog.at_level(logging.WARNING):
        run(node["train"], **train(lora_name="", steps=1)(context) | {"targets": targets})
    assert "identical to its target: nothing to learn" in caplog.text and "raise the surrogate strength" in caplog.text
    assert tree(comfy["base"]) == files  # nothing saved without a name
    assert_same_weights(context["model"], weights)


def test_an_image_the_vae_cannot_take_whole_is_resized_with_a_warning_not_cropped(comfy, node, context, caplog):
    """ComfyUI's VAE centre-crops sides that are not a multiple of 8; the pack resizes the whole target."""
    from instance_unlearn.nodes.host import vae

    image = torch.rand(1, 60, 68, 3, generator=torch.Generator().manual_seed(4))
    targets, _ = run(node["mark"], forget_set="odd_size", indices="0", images=image, conditioning=context["conditioning"])
    with caplog.at_level(logging.WARNING):
        built, _, _ = run(node["surrogate"], **surrogate(method="flip")(context) | {"targets": targets})
    assert "image 68x60 is not a multiple of the VAE's scale 8: resized to 64x64 (not cropped)" in caplog.text
    stored = targets.targets[0].image.unsqueeze(0)  # as the forget set holds it (8-bit)
    with torch.inference_mode():
        whole = context["vae"].encode(torch.nn.functional.interpolate(
            stored.movedim(-1, 1), size=(64, 64), mode="bilinear", antialias=True).movedim(1, -1).clamp(0, 1))  # fmt: skip
        cropped = context["vae"].encode(stored)  # what ComfyUI alone would do
    latent = built.targets[0].latent
    assert latent.shape == (16, 8, 8) and vae.vae_scale(context["vae"]) == 8
    assert torch.allclose(latent, whole[0], atol=1e-4)
    assert cropped.shape[-2:] == (7, 8), "ComfyUI alone would have cut 4 pixels off each side of the target"
