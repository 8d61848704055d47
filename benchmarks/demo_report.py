"""The demo's figures for the README: run the offline demo once and keep its report as JSON.

Runs :func:`unlearn_core.demo.run.run_demo` with its defaults (what ``make demo`` does) into a
scratch folder, writes the report to ``benchmarks/results/demo_report.json`` and keeps its grid
as the README's picture (``docs/demo_grid.png``).

    python benchmarks/demo_report.py               # about 2 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from unlearn_core.demo.run import run_demo
from unlearn_core.formats.files import atomic_write_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "demo_report.json")
    parser.add_argument("--grid", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "demo_grid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        report = run_demo(scratch)
        shutil.copyfile(Path(scratch) / report["files"]["grid"], args.grid)
    atomic_write_text(args.json, json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
