"""A real ComfyUI for integration tests: in-process (its executor's node classes and models) and
as a server subprocess. Everything is skipped unless COMFYUI_PATH points at a checkout.

Tiny models are built here (random weights, no downloads): a depth-2 MMDiT saved with
diffusers keys (loaded by the stock UNETLoader path as SD3) and a small SD3-style VAE.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
ROOT = Path(__file__).resolve().parents[2]
PACK = "instance_unlearn"

pytestmark = pytest.mark.comfyui


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="set COMFYUI_PATH to a ComfyUI checkout to run the integration tests")
    for item in items:
        if "tests/comfyui" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI's modules, on the CPU, with models/output folders in a temp base directory."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set")
    sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True
    base = tmp_path_factory.mktemp("comfy_base")
    import folder_paths

    folder_paths.set_output_directory(str(base / "output"))
    for kind in ("diffusion_models", "vae", "loras"):
        (base / "models" / kind).mkdir(parents=True)
        folder_paths.add_model_folder_path(kind, str(base / "models" / kind), is_default=True)
    import comfy.model_management  # noqa: F401

    import nodes as comfy_nodes

    return {"base": base, "nodes": comfy_nodes, "folder_paths": folder_paths}


@pytest.fixture(scope="session")
def pack(comfy):
    """This repository imported the way ComfyUI imports a custom node folder (as a package)."""
    from conftest import import_pack

    return import_pack(PACK)


@pytest.fixture(scope="session")
def tiny_files(comfy):
    from . import tiny_models

    base = comfy["base"]
    unet = tiny_models.write_tiny_sd3(base / "models" / "diffusion_models" / "tiny_sd3.safetensors")
    vae = tiny_models.write_tiny_vae(base / "models" / "vae" / "tiny_sd3_vae.safetensors")
    return {"unet": unet.name, "vae": vae.name, "base": base}


@pytest.fixture(scope="session")
def loaded(comfy, tiny_files):
    """The tiny SD3 and VAE loaded through the stock loader nodes (inference mode, as in a prompt)."""
    import torch

    from . import tiny_models

    nodes = comfy["nodes"]
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet(tiny_files["unet"], "default")[0]
        vae = nodes.VAELoader().load_vae(tiny_files["vae"])[0]
    return {"model": model, "vae": vae, "conditioning": tiny_models.conditioning(0)}
