"""Bad inputs through the core API and the command line, one table per surface.

Every row is refused with an error whose message names what was wrong *and* what to change,
and nothing is written: the working folder is byte-identical before and after (see ``tree``),
and for rows that reach a model its weights are bit-identical. The ComfyUI nodes have the same
table in tests/comfyui/test_node_bad_inputs.py; hostile file names in tests/test_files.py.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_bit_identical, make_data, make_tiny_sd3, sd3_cond, snapshot, tree
from PIL import Image
from safetensors.torch import save_file

from unlearn_core import (
    ForgetTargets,
    RectifiedFlow,
    RememberSet,
    UnlearnConfig,
    UnlearnData,
    save_lora,
)
from unlearn_core.backends.diffusers_backend import unlearn_diffusers
from unlearn_core.cli import main
from unlearn_core.data.forget_set import ForgetSetStore
from unlearn_core.data.surrogate import build_surrogate
from unlearn_core.errors import InputError
from unlearn_core.formats.lora import load_lora

FLOW = RectifiedFlow()


@dataclass
class Case:
    id: str
    action: Callable
    wrong: str  # regex: the message names what was wrong
    fix: str  # regex: ... and what to change


def assert_explains(error: BaseException, case: Case) -> None:
    message = str(error)
    assert re.search(case.wrong, message), f"{case.id}: {message!r} does not say what was wrong ({case.wrong})"
    assert re.search(case.fix, message), f"{case.id}: {message!r} does not say what to change ({case.fix})"


# --- the core API ------------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path
    store: ForgetSetStore
    model: torch.nn.Module

    def train(self, data=None, **config):
        """Unlearn on the tiny model and save the LoRA, as a caller would on success."""
        values = dict(steps=2, learning_rate=1e-3, lora_rank=2, forget_batch_size=1, remember_batch_size=1)
        outcome = unlearn_diffusers(self.model, FLOW, data or make_data(4, 8, sd3_cond), UnlearnConfig(**{**values, **config}))
        return save_lora(self.root / "loras" / "forget.safetensors", outcome.lora)


def image(h=16, w=24, seed=0):
    return torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed))


def with_value(tensor, index, value):
    tensor = tensor.clone()
    tensor.view(-1)[index] = value
    return tensor


DAMAGED_MANIFESTS = {
    "garbled": "{not json",
    "old_version": json.dumps({"version": 9, "targets": []}),
    "a_list": "[]",
    "bad_entry": json.dumps({"version": 1, "targets": ["0123456789abcdef.png"]}),
    "unknown_field": json.dumps({"version": 1, "targets": [{"id": "x", "image": "x.png", "width": 1, "height": 1, "evil": 1}]}),
}


def record(image_name):
    return {"id": "0123456789abcdef", "image": image_name, "width": 8, "height": 8}


@pytest.fixture(scope="module")
def base_model():
    return make_tiny_sd3()


@pytest.fixture
def workspace(tmp_path, base_model):
    """A forget-set store with one good set and every kind of damaged one, and the tiny model."""
    store = ForgetSetStore(tmp_path / "store")
    store.add("good", image())
    for name, text in DAMAGED_MANIFESTS.items():
        (tmp_path / "store" / name).mkdir()
        (tmp_path / "store" / name / "manifest.json").write_text(text)
    (tmp_path / "store" / "manifest_is_a_folder" / "manifest.json").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "secret.png")
    for name, image_name in (("missing_file", "0123456789abcdef.png"), ("escaping", "../../secret.png"),
                             ("absolute", str(tmp_path / "secret.png"))):  # fmt: skip
        (tmp_path / "store" / name).mkdir()
        (tmp_path / "store" / name / "manifest.json").write_text(json.dumps({"version": 1, "targets": [record(image_name)]}))
    return Workspace(tmp_path, store, base_model)


def load_first_image(store: ForgetSetStore, name: str):
    return store.load_image(name, store.records(name)[0])


def data_with(targets=None, surrogates=None, remember=None, forget_cond=None, remember_cond=None):
    base = make_data(4, 8, sd3_cond)
    return UnlearnData(
        ForgetTargets(base.forget.targets if targets is None else targets,
                      base.forget.surrogates if surrogates is None else surrogates,
                      base.forget.cond if forget_cond is None else forget_cond),
        RememberSet(base.remember.samples if remember is None else remember,
                    base.remember.cond if remember_cond is None else remember_cond),
    )  # fmt: skip


MASK_MISMATCH = torch.ones(8, 8)
DAMAGED = ("damaged", "delete .*manifest.json and mark the outputs again")
BAD_NAME = ("is not allowed", "use 1-100 letters, digits")
NAN = ("NaN/inf",)

CONFIG_TABLE = [
    ("steps", 0, r"steps=0 must be a whole number in \[1, ", "zero steps would train nothing"),
    ("steps", -5, "steps=-5", r"whole number in \[1, "),
    ("steps", 2.5, "steps=2.5", "must be a whole number"),
    ("steps", True, "steps=True", "must be a whole number"),
    *[("learning_rate", value, rf"learning_rate={value} must lie in \(0, 0.1\]", "LoRA unlearning uses about 1e-4 to 1e-2")
      for value in (5.0, float("nan"), float("inf"), -1e-4, 0.0)],
    ("lora_rank", 0, "lora_rank=0", r"whole number in \[1, 1024\]"),
    ("lora_rank", 10**6, "lora_rank=1000000", r"whole number in \[1, 1024\]"),
    ("forget_batch_size", 0, "forget_batch_size=0", r"whole number in \[1, 4096\]"),
    ("remember_batch_size", 10**9, "remember_batch_size=1000000000", r"whole number in \[1, 4096\]"),
    ("gamma", -1.0, "gamma=-1.0 must lie in", "1 to 4 is the useful range"),
    ("gamma", float("nan"), "gamma=nan must lie in", "1 to 4 is the useful range"),
    ("surgery", "pcgrad", "surgery='pcgrad'", "is not one of: .*project_forget"),
    ("method", "esd", "method='esd'", "is not one of: .*surrogate"),
    ("weighting", "cosine", "weighting='cosine'", "is not one of: .*power"),
    ("dtype", "float8", "dtype='float8'", "is not one of: .*bfloat16"),
    ("adapter", "dora", "adapter='dora'", "is not one of: .*full"),
    ("grad_clip", 0.0, "grad_clip=0.0", "must be positive, or None to disable"),
    ("grad_clip", float("inf"), "grad_clip=inf", "must be positive, or None to disable"),
    ("lora_alpha", -2.0, "lora_alpha=-2.0", "must be positive, or None for alpha = rank"),
    ("target_modules", (), "target_modules is empty", "give module names or None"),
    ("constant_lambda", 2.0, "constant_lambda=2.0", r"must lie in \[0, 1\]"),
]  # fmt: skip

CORE_CASES = [
    # forget sets on disk
    *[Case(f"manifest {name}", lambda ws, n=name: ws.store.records(n), *DAMAGED) for name in DAMAGED_MANIFESTS],
    Case("manifest is a folder", lambda ws: ws.store.records("manifest_is_a_folder"), *DAMAGED),
    Case("manifest lists a missing file", lambda ws: load_first_image(ws.store, "missing_file"),
         "lists 0123456789abcdef.png but the file is missing", "mark that output again"),
    Case("manifest points outside its set", lambda ws: load_first_image(ws.store, "escaping"), *BAD_NAME),
    Case("manifest points at an absolute path", lambda ws: load_first_image(ws.store, "absolute"), *BAD_NAME),
    Case("mark: mask of the wrong size", lambda ws: ws.store.add("good", image(seed=1), mask=MASK_MISMATCH),
         r"mask \(8, 8\) does not fit the image \(16, 24\)", "resize it to the image size"),
    Case("mark: all-zero mask", lambda ws: ws.store.add("new", image(), mask=torch.zeros(16, 24)),
         r"mask is empty \(all zero\)", "paint the undesired region"),
    Case("mark: NaN mask", lambda ws: ws.store.add("new", image(), mask=with_value(torch.ones(16, 24), 3, float("nan"))),
         *NAN, "draw the mask again"),
    Case("mark: NaN image", lambda ws: ws.store.add("new", with_value(image(), 5, float("nan"))), *NAN, "regenerate it"),
    Case("mark: inf latent", lambda ws: ws.store.add("new", image(), latent=with_value(torch.zeros(4, 2, 3), 0, float("inf"))),
         *NAN, "sample the image again"),
    Case("mark: latent of the wrong rank", lambda ws: ws.store.add("new", image(), latent=torch.zeros(2, 4, 2, 3)),
         r"one \(C, H, W\) tensor", "connect the sampler's LATENT"),
    Case("mark: image without channels", lambda ws: ws.store.add("new", torch.rand(16, 24)),
         r"must be \(height, width, channels\)", "connect a decoded image"),
    Case("mark: image too large", lambda ws: ws.store.add("new", torch.zeros(1, 9000, 3)),
         "9000x1 is outside 1..8192", "scale it down"),
    *[Case(f"mark: set name {name!r}", lambda ws, n=name: ws.store.add(n, image()), *BAD_NAME)
      for name in ("../escape", "/abs/set", "a/b", "con", "a|b", "", "%2e%2e")],
    # what training takes
    Case("empty forget set", lambda ws: ForgetTargets(torch.empty(0, 4, 8, 8), torch.empty(0, 4, 8, 8)),
         "forget set is empty", "mark at least one output"),
    Case("empty remember set", lambda ws: RememberSet(torch.empty(0, 4, 8, 8)),
         "remember set is empty", "give or generate at least one"),
    Case("surrogate of another size", lambda ws: data_with(surrogates=torch.zeros(1, 4, 4, 4)),
         r"surrogates \(1, 4, 4, 4\) do not match targets \(1, 4, 8, 8\)", "at the target's size"),
    Case("remember set of another size", lambda ws: data_with(remember=torch.zeros(6, 4, 16, 16)),
         "differ in channels or size", "same resolution"),
    Case("NaN target", lambda ws: data_with(targets=with_value(torch.zeros(1, 4, 8, 8), 7, float("nan"))),
         "forget target holds 1 NaN/inf", "regenerate or re-encode"),
    Case("inf surrogate", lambda ws: data_with(surrogates=with_value(torch.zeros(1, 4, 8, 8), 7, float("inf"))),
         "surrogate holds 1 NaN/inf", "regenerate or re-encode"),
    Case("NaN remember sample", lambda ws: data_with(remember=with_value(torch.zeros(6, 4, 8, 8), 0, float("nan"))),
         "remember sample holds 1 NaN/inf", "regenerate or re-encode"),
    Case("NaN conditioning", lambda ws: data_with(forget_cond={**sd3_cond(1), "pooled_projections": torch.full((1, 8), float("nan"))}),
         "conditioning 'pooled_projections' holds 8 NaN/inf", "regenerate or re-encode"),
    Case("conditioning of another batch size", lambda ws: data_with(forget_cond=sd3_cond(3)),
         "1 samples but its conditioning has 3", "give one per sample"),
    Case("conditioning kinds differ", lambda ws: data_with(remember_cond={"encoder_hidden_states": torch.zeros(6, 3, 16)}),
         "different conditioning kinds", "give both the same conditioning"),
    Case("inpaint: mask of the wrong size", lambda ws: build_surrogate("inpaint", torch.zeros(1, 4, 8, 8), sampler=ws,
                                                                       prompt={}, mask=torch.ones(1, 4, 4)),
         r"mask \(1, 4, 4\) does not fit the target \(1, 4, 8, 8\)", "resize it to the image size"),
    Case("inpaint: all-zero mask", lambda ws: build_surrogate("inpaint", torch.zeros(1, 4, 8, 8), sampler=ws, prompt={},
                                                              mask=torch.zeros(1, 8, 8)),
         r"mask is empty \(all zero\)", "paint the undesired region"),
    # the configuration, each through the trainer's entry point
    *[Case(f"config {field}={value!r}", lambda ws, f=field, v=value: ws.train(**{f: v}), wrong, fix)
      for field, value, wrong, fix in CONFIG_TABLE],
    Case("unknown config key", lambda ws: UnlearnConfig.from_dict({"stpes": 3}), "unknown config keys: stpes", "known: "),
    Case("rank larger than the layer", lambda ws: ws.train(lora_rank=64), "LoRA rank 64 is larger than layer", "lower lora_rank"),
    Case("LoRA targets match no layer", lambda ws: ws.train(target_modules=("no_such_layer",)),
         "no layer of SD3Transformer2DModel matches", "use None for the default set"),
    Case("a model type the method cannot handle",
         lambda ws: unlearn_diffusers(torch.nn.Linear(4, 4), FLOW, make_data(4, 8, sd3_cond), UnlearnConfig(steps=1)),
         "Linear is not supported", "handles diffusers SD3Transformer2DModel"),
    Case("a damaged LoRA file", lambda ws: load_lora(ws.root / "store" / "garbled" / "manifest.json"),
         "not a readable safetensors file", "save it again"),
]  # fmt: skip


@pytest.mark.parametrize("case", CORE_CASES, ids=lambda case: case.id)
def test_core_api_refuses_bad_input_and_writes_nothing(case, workspace):
    files, weights = tree(workspace.root), snapshot(workspace.model)
    with pytest.raises(InputError) as caught:
        case.action(workspace)
    assert_explains(caught.value, case)
    assert tree(workspace.root) == files, f"{case.id} wrote or changed files"
    assert_bit_identical(workspace.model, weights)


def test_surrogate_identical_to_its_target_warns_once_that_there_is_nothing_to_learn(workspace, caplog):
    data = make_data(4, 8, sd3_cond)
    weights = snapshot(workspace.model)
    surrogate = build_surrogate("edited_image", data.forget.targets, edited=data.forget.targets.clone())  # built, then trained
    identical = UnlearnData(ForgetTargets(data.forget.targets, surrogate, data.forget.cond), data.remember)
    with caplog.at_level(logging.WARNING, logger="unlearn_core"):
        workspace.train(identical)  # a warning, not an error: the run still works
    warning = caplog.text
    assert "identical to its target: nothing to learn" in warning and "raise the surrogate strength" in warning
    assert warning.count("identical to its target") == 1, "warned more than once"
    assert_bit_identical(workspace.model, weights)


# --- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider_files(tmp_path_factory):
    """A tiny diffusers model folder, a good targets file and damaged ones (shared, read-only)."""
    root = tmp_path_factory.mktemp("provider")
    make_tiny_sd3().save_pretrained(root / "transformer")
    (root / "not_a_model").mkdir()
    targets = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"targets": targets, **sd3_cond(1)}, str(root / "targets.safetensors"))
    save_file({"images": targets, **sd3_cond(1)}, str(root / "no_targets.safetensors"))
    save_file({"targets": with_value(targets, 3, float("nan")), **sd3_cond(1)}, str(root / "nan.safetensors"))
    save_file({"targets": torch.zeros(0, 4, 8, 8)}, str(root / "empty.safetensors"))
    save_file({"targets": targets, "surrogates": torch.zeros(1, 4, 4, 4), **sd3_cond(1)}, str(root / "bad_surrogates.safetensors"))
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return root


def job_for(files: Path, **changes) -> dict:
    job = {"model": {"path": str(files / "transformer"), "kind": "sd3"}, "targets": str(files / "targets.safetensors"),
           "surrogate": {"method": "sdedit", "strength": 0.5, "steps": 2}, "remember": {"generate": 2, "steps": 2},
           "config": {"steps": 2, "lora_rank": 2, "forget_batch_size": 1, "remember_batch_size": 1},
           "output": "out/forget.safetensors", "key_format": "comfy"}  # fmt: skip
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            job[section] = {**job[section], field: value}
        elif value is None:
            job.pop(section)
        else:
            job[section] = value
    return job


def files_path(name):
    return lambda files: str(files / name)


RUN_CASES = [
    Case("job file missing", None, "does not exist", "give the path of your job"),
    Case("job file is not JSON", "{model: sd3", "is not readable JSON", "fix it"),
    Case("job file is a list", "[1, 2]", "must hold one JSON object", "with model, targets, config and output"),
    Case("unknown job key", {"confg": {}}, r"unknown job keys \['confg'\]", "known: "),
    Case("config is not an object", {"config": [1]}, "'config' must be a JSON object", "JSON object"),
    Case("zero steps", {"config__steps": 0}, "steps=0", r"whole number in \[1, "),
    Case("absurd learning rate", {"config__learning_rate": 10}, "learning_rate=10", "about 1e-4 to 1e-2"),
    Case("unknown config key", {"config__stpes": 3}, "unknown config keys: stpes", "known: "),
    Case("rank larger than the layer", {"config__lora_rank": 64}, "larger than layer", "lower lora_rank"),
    *[Case(f"output name {name!r}", {"output": name}, *BAD_NAME)
      for name in ("../escape.safetensors", "/tmp/abs.safetensors", "a|b", "con.safetensors", "out/../../x")],
    Case("unknown key format", {"key_format": "kohya"}, "key_format='kohya'", "is not one of: comfy, diffusers"),
    Case("unknown model kind", {"model__kind": "flux2"}, "model.kind must be one of sd3, flux, qwen_image, unet, unet_cond",
         "got 'flux2'"),
    Case("model is not an object", {"model": "sd3"}, "'model' must be a JSON object", "JSON object"),
    Case("model folder missing", {"model__path": "nowhere"}, "model.path .*nowhere' does not exist", "does not exist"),
    Case("model folder without a model", {"model__path": files_path("not_a_model")}, "is not a SD3Transformer2DModel folder",
         "give the folder that save_pretrained wrote"),
    Case("model shift out of range", {"model__shift": -1}, "model.shift=-1 is outside", "give a value in that range"),
    Case("targets file missing", {"targets": None}, "the job needs targets", "needs targets"),
    Case("targets file not found", {"targets": "missing.safetensors"}, "targets .*missing.safetensors' does not exist", "does not exist"),
    Case("damaged targets file", {"targets": files_path("corrupt.safetensors")}, "not a readable safetensors file",
         "write it with safetensors.torch.save_file"),
    Case("targets tensor missing", {"targets": files_path("no_targets.safetensors")}, "needs a 'targets' tensor", r"\(N, C, H, W\)"),
    Case("empty forget set", {"targets": files_path("empty.safetensors")}, "must be a non-empty", "put at least one target"),
    Case("NaN targets", {"targets": files_path("nan.safetensors")}, "NaN/inf", "re-encode the target images"),
    Case("surrogates of another size", {"targets": files_path("bad_surrogates.safetensors")}, "do not match targets",
         "at the target's size"),
    Case("surrogate strength above 1", {"surrogate__strength": 5}, "surrogate.strength=5 is outside", "give a value in that range"),
    Case("unknown surrogate method", {"surrogate__method": "inpaint"}, "surrogate.method must be 'sdedit'", "without surrogates"),
    Case("huge remember count", {"remember__generate": 10**12}, "remember.generate=1000000000000 is outside",
         "give a value in that range"),
    Case("remember count as text", {"remember__generate": "many"}, "remember.generate='many'", "must be a whole number"),
    Case("fractional remember count", {"remember__generate": 2.5}, "remember.generate=2.5", "must be a whole number"),
]  # fmt: skip


def resolve(value, files: Path):
    if callable(value):
        return value(files)
    if isinstance(value, dict):
        return {k: resolve(v, files) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", RUN_CASES, ids=lambda case: case.id)
def test_cli_run_refuses_a_bad_job_with_exit_code_2_and_writes_nothing(case, provider_files, tmp_path, caplog):
    job_file = tmp_path / "job.json"
    if isinstance(case.action, str):
        job_file.write_text(case.action)
    elif isinstance(case.action, dict):
        job_file.write_text(json.dumps(job_for(provider_files, **resolve(case.action, provider_files))))
    before, shared = tree(tmp_path), tree(provider_files)
    with caplog.at_level(logging.ERROR, logger="unlearn_core"):
        assert main(["run", str(job_file)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert_explains(InputError(errors[0]), case)
    assert tree(tmp_path) == before and tree(provider_files) == shared, f"{case.id} wrote files"
    assert not (tmp_path.parent / "escape.safetensors").exists() and not Path("/tmp/abs.safetensors").exists()


DEMO_CASES = [
    Case("unknown target class", ["--target", "narnia:1"], "target 'narnia:1' must look like CLASS:SEED", "CLASS one of japan, ireland"),
    Case("target seed is not a number", ["--target", "ireland:x"], "must look like CLASS:SEED", "CLASS one of"),
    Case("zero steps", ["--steps", "0"], "steps=0", r"whole number in \[1, "),
    Case("negative steps", ["--steps", "-3"], "steps=-3", r"whole number in \[1, "),
    Case("negative gamma", ["--gamma", "-1"], r"gamma=-1.0 must lie in \[0, 20\]", "1 to 4 is the useful range"),
    Case("strength above 1", ["--strength", "5"], r"strength=5.0 must lie in \(0, 1\]", "0.3-0.7 edits mildly"),
    Case("NaN strength", ["--strength", "nan"], r"strength=nan must lie in \(0, 1\]", "0.3-0.7 edits mildly"),
    Case("output folder is a file", ["--out", "{file}"], "is a file", "give a folder"),
]  # fmt: skip

ARGPARSE_CASES = [
    Case("unknown surrogate", ["demo", "--surrogate", "blur"], "invalid choice: 'blur'", "choose from"),
    Case("zero threads", ["--threads", "0", "demo"], "'0' is not a whole number of at least 1", "at least 1"),
    Case("steps as text", ["demo", "--steps", "many"], "invalid int value: 'many'", "--steps"),
    Case("no command", [], "the following arguments are required", "command"),
    Case("unknown command", ["train"], "invalid choice: 'train'", "choose from"),
    Case("run without a job", ["run"], "the following arguments are required: config", "config"),
]  # fmt: skip


@pytest.mark.parametrize("case", DEMO_CASES, ids=lambda case: case.id)
def test_cli_demo_refuses_bad_arguments_before_any_work(case, tmp_path, caplog):
    (tmp_path / "a_file").write_text("keep me")
    argv = [arg.replace("{file}", str(tmp_path / "a_file")) for arg in case.action]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "demo")]
    before = tree(tmp_path)
    with caplog.at_level(logging.ERROR, logger="unlearn_core"):
        assert main(["demo", *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert_explains(InputError(errors[0]), case)
    assert tree(tmp_path) == before, f"{case.id} wrote files"


@pytest.mark.parametrize("case", ARGPARSE_CASES, ids=lambda case: case.id)
def test_cli_refuses_malformed_arguments_with_usage_and_exit_code_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(case.action)
    assert caught.value.code == 2
    assert_explains(InputError(capsys.readouterr().err), case)
    assert tree(tmp_path) == {}


def test_the_installed_command_exits_2_with_the_message_on_stderr(tmp_path):
    """The real entry point (`python -m unlearn_core`), not just main(): exit code and stderr."""
    result = subprocess.run([sys.executable, "-m", "unlearn_core", "run", str(tmp_path / "job.json")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "does not exist; give the path of your job .json" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree(tmp_path) == {}
