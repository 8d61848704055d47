"""The flat module names of earlier releases (``unlearn_core.lora``, ``unlearn_core.metrics``, ...)
still import, as the very module objects of the part folders, so saved scripts keep working.

New code imports from the folders (``unlearn_core.formats.lora``) or from ``unlearn_core`` itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old flat name -> its module in the part folders
MOVED = {
    "denoiser": "diffusion.denoiser", "process": "diffusion.process", "sampling": "diffusion.sampling",
    "objectives": "method.objectives", "weighting": "method.weighting", "surgery": "method.surgery",
    "split_gradients": "method.split_gradients", "trainer": "method.trainer", "stopping": "method.stopping",
    "config": "method.config",
    "forget_set": "data.forget_set", "surrogate": "data.surrogate", "remember": "data.remember",
    "masks": "data.masks", "seeds": "data.seeds",
    "lora": "formats.lora", "full_weights": "formats.full_weights", "files": "formats.files",
    "model_folders": "formats.model_folders", "apply": "formats.apply",
    "metrics": "verify.metrics", "preserve": "verify.preserve", "previews": "verify.previews",
    "provider": "serve.provider", "request_queue": "serve.request_queue",
    "request_worker": "serve.request_worker", "cluster": "serve.cluster",
}  # fmt: skip
# ``unlearn_core.data`` was the module of ForgetTargets, RememberSet and UnlearnData; it is now the
# data folder, which hands those three on (data/__init__.py).


class _Existing(importlib.abc.Loader):
    """Hands the import system the module already imported under its new name: one module object,
    so classes compare equal whichever name a script used."""

    def __init__(self, module_name: str):
        self.module_name = module_name

    def create_module(self, spec):
        return importlib.import_module(self.module_name)

    def exec_module(self, module):
        pass


class OldPaths(importlib.abc.MetaPathFinder):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != self.package or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Existing(f"{self.package}.{MOVED[name]}"))


def install(package: str) -> None:
    """Let ``package.<old name>`` import (``package`` is ``unlearn_core``, or the pack's
    ``instance_unlearn.unlearn_core`` inside ComfyUI)."""
    if not any(isinstance(f, OldPaths) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(OldPaths(package))
