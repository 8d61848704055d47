"""The pack's files inside ComfyUI's folders: the one module of the nodes that reads folder_paths.

- LoRAs: ``models/loras/<name>.safetensors`` (the stock LoRA loaders list them), and after a
  request on an existing LoRA the merged one beside it, ``<name>.merged.safetensors``;
- Preserve Check reports: beside the LoRA, or ``output/unlearn/reports/``;
- forget sets: ``output/unlearn/forget_sets/<set>/``;
- copy detectors (SSCD TorchScript files) for Preserve Check: ``models/unlearn/``, plus any
  ``unlearn:`` folder listed in ComfyUI's extra_model_paths.yaml.

Every user-given name goes through :func:`~unlearn_core.formats.files.safe_child`: it cannot leave its folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import folder_paths

from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.files import atomic_write_bytes, safe_child, sibling
from ..unlearn_core.verify.metrics import CopyDetector, PixelCopyDetector, TorchScriptCopyDetector

COPY_DETECTOR_SUFFIXES = (".pt", ".pth", ".torchscript")
COPY_DETECTOR_FOLDER = "unlearn"  # under models/


def loras_folder() -> Path:
    folders = folder_paths.get_folder_paths("loras")
    if not folders:
        raise InputError("ComfyUI has no loras folder configured")
    return Path(folders[0]).resolve()


def lora_path(name: str) -> Path:
    """models/loras/<name>.safetensors for a LoRA name (subfolders allowed)."""
    return safe_child(loras_folder(), name, ".safetensors", what="LoRA name")


NO_LORA = "[None]"  # existing_lora option: train on the model as it is (TrainLoraNode's spelling)


def lora_files() -> list[str]:
    """The LoRA files the stock loaders list (names relative to a loras folder, subfolders as '/')."""
    return list(folder_paths.get_filename_list("loras"))


def existing_lora_path(name: str) -> Path:
    """The file of a listed LoRA name, inside one of ComfyUI's loras folders."""
    for folder in folder_paths.get_folder_paths("loras"):
        path = safe_child(folder, name, ".safetensors", what="LoRA name")
        if path.is_file():
            return path
    raise InputError(f"existing_lora {name!r} is not in models/loras; choose a LoRA an earlier run of this node saved, or {NO_LORA}")


def merged_lora_path(path: Path) -> Path:
    """Where the merged LoRA of a model line goes beside a request's own: NAME.merged.safetensors."""
    return sibling(path, ".merged.safetensors")


def lora_name(path: Path) -> str:
    """The name LoraLoaderModelOnly lists a saved LoRA under."""
    return path.relative_to(loras_folder()).as_posix()


def report_path(lora: str, forget_set: str) -> Path:
    """Preserve Check's report: beside the LoRA when its name is given, else a dated file under output/."""
    if lora.strip():
        lora_file = lora_path(lora)
        return sibling(lora_file, ".report.json")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = Path(folder_paths.get_output_directory()) / "unlearn" / "reports"
    return safe_child(reports, f"{forget_set}_{stamp}", ".json", what="report name")


def forget_sets_folder() -> Path:
    return Path(folder_paths.get_output_directory()) / "unlearn" / "forget_sets"


def directory_by_type(kind: str) -> str | None:
    """ComfyUI's output/input/temp folder (what an image reference's "type" names)."""
    return folder_paths.get_directory_by_type(kind)


def copy_detector_folders() -> list[Path]:
    folders = [Path(folder_paths.models_dir) / COPY_DETECTOR_FOLDER]
    if COPY_DETECTOR_FOLDER in folder_paths.folder_names_and_paths:  # extra_model_paths.yaml may add some
        folders += [Path(f) for f in folder_paths.get_folder_paths(COPY_DETECTOR_FOLDER)]
    return list(dict.fromkeys(folder.resolve() for folder in folders))


def copy_detector_files() -> list[str]:
    """Names of the copy-detector files (subfolders as '/'), for Preserve Check's list."""
    names = set()
    for folder in copy_detector_folders():
        if folder.is_dir():
            names.update(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                         if path.is_file() and path.suffix.lower() in COPY_DETECTOR_SUFFIXES)  # fmt: skip
    return sorted(names)


PIXEL = "pixel"  # copy_detector option: the core's built-in pixel detector (no file)


def load_copy_detector(name: str) -> CopyDetector:
    """The copy detector a node judges copies with (Preserve Check, the training node's forgetting
    check, Build Surrogate): an SSCD TorchScript file from the copy-detector folders, or pixels."""
    if name == PIXEL:
        return PixelCopyDetector()
    return TorchScriptCopyDetector(copy_detector_path(name))


def copy_detector_path(name: str) -> Path:
    """The file of a listed copy-detector name, inside one of the copy-detector folders."""
    for folder in copy_detector_folders():
        path = safe_child(folder, name, what="copy-detector name")
        if path.is_file():
            return path
    shown = ", ".join(str(folder) for folder in copy_detector_folders())
    raise InputError(f"copy detector {name!r} is not in {shown}; put the SSCD TorchScript file there, or choose pixel")


#: input images the shipped workflows load (copied into ComfyUI's input folder when missing)
EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "input"


def install_example_inputs() -> list[str]:
    """Copy the workflows' example inputs into ComfyUI's input folder, never over a file of the
    same name (the user's own stays). Returns the names copied."""
    target = Path(folder_paths.get_input_directory())
    copied = []
    for source in sorted(EXAMPLE_INPUTS.glob("*.png")):
        if not (target / source.name).exists():
            atomic_write_bytes(target / source.name, source.read_bytes())
            copied.append(source.name)
    return copied
