"""The library stays host-free, and the package metadata agrees with itself."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution")


def test_unlearn_core_never_imports_the_host():
    pattern = re.compile(r"^\s*(import|from)\s+(" + "|".join(HOST_MODULES) + r")\b", re.M)
    offenders = [str(p) for p in (ROOT / "unlearn_core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    code = (
        "import sys, unlearn_core, unlearn_core.backends.diffusers_backend, unlearn_core.verify.metrics, "
        "unlearn_core.data.surrogate, unlearn_core.formats.lora\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r}]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_host_and_paths_touch_comfyuis_objects():
    """The nodes/host/ package owns every ComfyUI object and nodes/paths.py its folders; every other
    module of nodes/ imports only comfy_api's io (the schema types) besides the pack."""
    host_only = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|folder_paths|server|execution)\b|import PromptServer", re.M)
    model_objects = re.compile(r"^\s*from\s+comfy_api\S*\s+import\s+(?!.*\b(io|ui|ComfyExtension)\b)", re.M)
    host = ROOT / "nodes" / "host"
    nodes = sorted(p for p in (ROOT / "nodes").rglob("*.py") if host not in p.parents)
    assert ROOT / "nodes" / "unlearn_lora.py" in nodes
    offenders = [p.name for p in nodes if p.name != "paths.py" and host_only.search(p.read_text())]
    assert offenders == []
    assert [p.name for p in nodes if model_objects.search(p.read_text())] == []
    # the pattern finds what it looks for, in the host package as in paths.py
    assert "import folder_paths" in (ROOT / "nodes" / "paths.py").read_text()
    assert all(host_only.search((host / name).read_text()) for name in ("adapters.py", "sampling.py", "events.py"))


def test_root_package_imports_without_comfyui():
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('pack', '__init__.py', submodule_search_locations=['.'])\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "assert pack.WEB_DIRECTORY == './web' and callable(pack.comfy_entrypoint)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r}]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_versions_and_comfy_table_agree():
    import unlearn_core

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["version"] == unlearn_core.__version__
    assert "comfyui" not in project["project"]["name"].lower()
    comfy = project["tool"]["comfy"]
    assert all(comfy.get(key) for key in ("PublisherId", "DisplayName", "Icon")), "the Registry shows all three"
    repository = project["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    icon = comfy["Icon"].removeprefix(f"https://raw.githubusercontent.com/{repository}/main/")
    assert (ROOT / icon).is_file(), "the Registry's icon is a file of this repository"


def test_the_license_is_declared_as_setuptools_and_the_registry_read_it():
    """An SPDX string with the file beside it: the TOML-table form makes setuptools warn at every
    install, and the Registry reads the string."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_the_registry_scanners_rules_are_linted():
    """The Comfy Registry refuses a pack with exec (S102), eval (S307) or statements joined by ';'
    (E702): ruff checks the same rules here."""
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"S102", "S307"} <= set(lint["select"]) and "E" in lint["select"] and "E702" not in lint.get("ignore", [])


def test_requirements_txt_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {d for d in project["project"]["dependencies"] if d != "torch"}
    listed = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert listed == declared


@pytest.mark.parametrize("written", ["out/demo/grid.png", "provider/out/forget.safetensors", "provider/shapes-pipeline/unet/config.json"])
def test_what_the_demo_and_the_provider_walkthrough_write_is_not_tracked(written):
    """make demo writes out/, the walkthrough of docs/PROVIDERS.md writes provider/ (27 MB): git ignores both."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "check-ignore", "-q", written], cwd=ROOT).returncode == 0, written


def test_the_flat_module_names_of_earlier_releases_import_as_the_same_modules():
    """Saved scripts wrote unlearn_core.lora, unlearn_core.metrics, ...: each still imports, and is
    the very module of its part folder (one class object whichever name a script used)."""
    import importlib

    from unlearn_core.old_paths import MOVED

    folders = {p.parent.name for p in (ROOT / "unlearn_core").glob("*/__init__.py")}
    for old, new in MOVED.items():
        assert not (ROOT / "unlearn_core" / f"{old}.py").exists() and new.split(".")[0] in folders
        assert importlib.import_module(f"unlearn_core.{old}") is importlib.import_module(f"unlearn_core.{new}")
    from unlearn_core.data import UnlearnData
    from unlearn_core.data.sets import UnlearnData as moved

    assert UnlearnData is moved
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("unlearn_core.no_such_module")
