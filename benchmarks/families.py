"""Which model families the pack trains under a real ComfyUI: the family table of docs/COMFYUI_GUIDE.md.

Runs ``tests/comfyui/test_families.py`` (each family end to end on a tiny random-weight network
that ComfyUI's own detection recognises through the stock UNETLoader: mark -> surrogate -> train ->
save -> LoraLoaderModelOnly -> Preserve Check, the base bit-identical) against the ComfyUI at
COMFYUI_PATH, run by that ComfyUI's Python, and writes per family what the run found: passed or
skipped (and why), the model class ComfyUI detected, the network, the default LoRA targets, the
layers in the saved file and how many the stock loader patched, and the test's seconds.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/families.py --python /path/to/ComfyUI/.venv/bin/python
        [--commit SHA]   # about a minute; writes benchmarks/results/families_<ComfyUI version>.json
    python benchmarks/families.py --table benchmarks/results/families_0.33.0.json benchmarks/results/families_0.3.64.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from unlearn_core.formats.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/comfyui/test_families.py"


def comfyui_version(path: Path, commit: str | None) -> dict:
    text = (path / "comfyui_version.py").read_text()
    version = re.search(r'__version__ = "([^"]+)"', text).group(1)
    if commit is None:  # a git work tree says it; a snapshot's files do not
        found = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = found.stdout.strip() if found.returncode == 0 else None
    return {"version": version, "commit": commit}


def families(junit: Path) -> dict:
    """Per family, from the JUnit XML of one run of the test (its properties and outcome)."""
    found = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        match = re.search(r"trains_saves_and_loads_with_every_key\[(\w+)\]", case.get("name", ""))
        if not match:
            continue
        row = {"seconds": round(float(case.get("time", 0)), 1)}
        skipped = case.find("skipped")
        # an element without children is falsy: look for None, not for truth
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        if skipped is not None:
            row.update(outcome="skipped", reason=skipped.get("message", ""))
        elif failed is not None:
            row.update(outcome="failed", reason=failed.get("message", "")[:300])
        else:
            row["outcome"] = "passed"
        for prop in case.iter("property"):
            if prop.get("name") == "family":
                row.update(json.loads(prop.get("value")))
        found[match.group(1)] = row
    return found


#: the table's rows: family -> (what users call it, its usual loader), in the table's order
ROWS = {
    "sd3": ("SD3 / SD3.5", "Load Checkpoint"), "flux": ("Flux.1 dev", "Load Diffusion Model"),
    "flux_schnell": ("Flux.1 schnell", "Load Diffusion Model"),
    "flux2": ("Flux.2", "Load Diffusion Model"), "chroma": ("Chroma", "Load Diffusion Model"),
    "hidream": ("HiDream I1", "Load Diffusion Model"), "qwen_image": ("Qwen-Image", "Load Diffusion Model"), "z_image": ("Z-Image / Lumina 2", "Load Diffusion Model"),
    "sdxl": ("SDXL", "Load Checkpoint"), "sd15": ("SD1.5", "Load Checkpoint"),
}  # fmt: skip


def table(reports: list[dict]) -> str:
    """The family table (docs/COMFYUI_GUIDE.md) from the reports of one or more ComfyUI versions."""
    versions = [r["comfyui"]["version"] for r in reports]
    lines = ["| family | ComfyUI detects | loader | LoRA layers (tiny model): in the file / applied by LoraLoaderModelOnly | "
             + " | ".join(f"ComfyUI {v}" for v in versions) + " |", "|---|---|---|---|" + "---|" * len(versions)]  # fmt: skip
    for name, (family, loader) in ROWS.items():
        rows = [r["families"].get(name, {"outcome": "not run"}) for r in reports]
        passed = next((row for row in rows if row["outcome"] == "passed"), {})
        detected = f"{passed['model_class']} ({passed['model_type']})" if passed else "-"
        if passed.get("tiny_widths"):
            detected += " *"
        layers = f"{passed['file_layers']} / {passed['patched_by_stock_loader']}" if passed else "-"
        outcomes = [row["outcome"] if row["outcome"] != "skipped" else f"skipped: {row['reason'].split(':')[0]}" for row in rows]
        lines.append(f"| {family} | {detected} | {loader} | {layers} | " + " | ".join(outcomes) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python of the ComfyUI's environment")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/families_<version>.json")
    parser.add_argument("--commit", help="the ComfyUI commit, where its folder is not a git work tree")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="print the family table from these reports and run nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(path.read_text()) for path in args.table]))
        return 0
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        parser.error("set COMFYUI_PATH to the ComfyUI to test against")
    host = comfyui_version(Path(comfy), args.commit)
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "families.xml"
        command = [args.python, "-m", "pytest", "-p", "no:cacheprovider", TEST, "-m", "comfyui", "-q",
                   f"--junitxml={junit}", "-o", "junit_family=xunit1"]  # fmt: skip
        run = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows = families(junit)
    report = {"comfyui": host, "test": TEST, "pytest_exit_code": run.returncode, "families": rows}
    path = args.json or ROOT / "benchmarks" / "results" / f"families_{host['version']}.json"
    atomic_write_text(path, json.dumps(report, indent=1, sort_keys=True) + "\n")
    for name, row in sorted(rows.items()):
        detail = f"{row.get('model_class')} {row.get('file_layers')} layers, {row.get('patched_by_stock_loader')} patched"
        print(f"{name:12s} {row['outcome']:8s} {row['seconds']:5.1f} s  " + (detail if row["outcome"] == "passed" else row["reason"][:90]))
    print(f"wrote {path}")
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
