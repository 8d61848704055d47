"""Requests one after another: a job that continues from the results of earlier requests.

A job's ``"earlier": ["first.safetensors", "second.safetensors"]`` names the LoRA files earlier
jobs wrote, oldest first, each trained on the model with the ones before it applied (a *model
line*). The new request then:

- trains on the base model with every earlier result applied (merged into the weights for the
  job and restored bit for bit after, :func:`~unlearn_core.formats.apply.merged`), so its remember
  set, surrogates and regenerations are those of the model as it is served;
- keeps every earlier target forgotten: the targets, surrogates and noise the last earlier
  request trained on (its ``.training.safetensors``, which holds its own earlier ones too) join the
  forget set, and the forgetting check judges them again with the base-copy marks their own
  request measured (the model at hand no longer copies them, so it cannot say what counts);
- writes its own LoRA and the exact sum of all of them (``NAME.merged.safetensors``,
  :func:`~unlearn_core.formats.lora.sum_of`: one file equal to every result applied at strength 1);
- records the *model state* it trained on: the sha256 of the base model's files and of every
  earlier result in order (:func:`model_state`). Each earlier result's report must name the state
  of the base plus the results before it, so a result of another base, one left out or one out
  of order is refused before any work, and a provider can show what the served model is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.sets import ForgetTargets
from ..errors import InputError
from ..formats.files import file_sha256, read_safetensors, sibling
from ..formats.full_weights import is_full_weights
from ..formats.lora import LoraWeights, load_lora

__all__ = ["Earlier", "read_earlier", "carried_marks", "model_state", "TRAINING_SUFFIX", "REPORT_SUFFIX"]

#: the files every job writes beside its result (see :mod:`unlearn_core.serve.provider`)
TRAINING_SUFFIX, REPORT_SUFFIX = ".training.safetensors", ".report.json"
_NOT_CONDITIONING = ("targets", "surrogates", "remember", "noise")


def model_state(base_files: dict[str, str], earlier_sha256: list[str]) -> dict:
    """The state of a model line: the base model's files and the results applied on it, in order,
    and one sha256 over both."""
    record = {"base_files_sha256": dict(sorted(base_files.items())), "results_sha256": list(earlier_sha256)}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return {**record, "sha256": digest}


@dataclass
class Earlier:
    """The earlier results of a job, read and checked; nothing loaded onto a model yet."""

    paths: list[Path]
    loras: list[LoraWeights]
    sha256: list[str]
    reports: list[dict]
    #: the forget data the last one trained on (every earlier target), in the targets-file format
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> int:
        return len(self.tensors["targets"])

    def check_chain(self, base_files: dict[str, str]) -> None:
        """Each result must have trained on the base plus the results before it, in this order."""
        for index, (path, report) in enumerate(zip(self.paths, self.reports, strict=True)):
            expected = model_state(base_files, self.sha256[:index])["sha256"]
            recorded = (report.get("model_state") or {}).get("sha256")
            if recorded != expected:
                before = "the base model alone" if index == 0 else f"the base model with {', '.join(p.name for p in self.paths[:index])}"
                raise InputError(f"earlier result {path.name} was not trained on {before} (its report names another model "
                                 "state): list the results of one model line, oldest first, on the base model they were "
                                 "trained from")  # fmt: skip

    def forget_targets(self, device: torch.device, cond_keys: set[str], shape: tuple[int, ...]) -> ForgetTargets:
        """The earlier targets, surrogates, noise and conditioning, checked against the new targets'."""
        tensors = self.tensors
        keys = {k for k in tensors if k not in _NOT_CONDITIONING and not k.startswith("remember.")}
        if keys != cond_keys:
            raise InputError(f"the earlier targets carry conditioning {sorted(keys)} but the new ones {sorted(cond_keys)}: "
                             "requests of one model line give the same conditioning kinds")  # fmt: skip
        if tuple(tensors["targets"].shape[1:]) != shape:
            raise InputError(f"the earlier targets are {tuple(tensors['targets'].shape[1:])} but the new ones {shape}: "
                             "one model line trains on targets of one size")  # fmt: skip
        def moved(key):  # only what the forget set takes (not the earlier remember set)
            return None if key not in tensors else tensors[key].float().to(device)

        return ForgetTargets(moved("targets"), moved("surrogates"), {k: moved(k) for k in keys}, moved("noise"))

    def carried_marks(self, nearby: int) -> torch.Tensor:
        """The base-copy marks the earlier targets bring (the last request's check baseline)."""
        return carried_marks(self.reports[-1].get("verification"), self.targets, nearby, self.paths[-1].name)


def carried_marks(verification: dict | None, targets: int, nearby: int, name: str) -> torch.Tensor:
    """The base-copy marks (``targets``, 1 + ``nearby``) an earlier result's forgetting check
    recorded in its ``verification`` (the baseline's ``counted``): which probes the base model copied,
    so the model at hand, which no longer copies them, can still judge those targets. ``name`` says
    which result in the refusals."""
    baseline = (verification or {}).get("baseline") or {}
    marks = baseline.get("counted")
    if marks is None:
        raise InputError(f"earlier result {name} records no forgetting check (it trained with stop_when_forgotten off, or "
                         "without the check's inputs), so its targets cannot be judged again: continue with "
                         "stop_when_forgotten false, or redo that request with it on")  # fmt: skip
    marks = torch.tensor(marks, dtype=torch.bool)
    if marks.ndim != 2 or marks.shape[0] != targets:
        raise InputError(f"earlier result {name} records check marks for {marks.shape[0] if marks.ndim else 0} targets "
                         f"but trained on {targets}; the file is not one this pack wrote")  # fmt: skip
    if marks.shape[1] != 1 + nearby:
        raise InputError(f"earlier result {name} checked its targets with {marks.shape[-1] - 1} nearby probes; "
                         f"continue with check_nearby {marks.shape[-1] - 1}")  # fmt: skip
    return marks


def read_earlier(paths: list[Path], kind: str) -> Earlier:
    """Read and check every earlier result (a LoRA of a ``kind`` model, with its training data and
    report beside it) before any work."""
    if not paths:
        raise InputError("earlier names no results: leave it out to train on the base model")
    loras, digests, reports = [], [], []
    for index, path in enumerate(paths):
        what = f"earlier[{index}] ({path.name})"
        if not path.is_file():
            raise InputError(f"{what} does not exist; give the .safetensors an earlier job wrote")
        if is_full_weights(path):
            raise InputError(f"{what} holds full weights: a request continues from earlier LoRA results (run the "
                             "earlier requests with adapter 'lora')")  # fmt: skip
        lora = load_lora(path)
        if lora.kind is not None and lora.kind != kind:
            raise InputError(f"{what} is a LoRA of a {lora.kind} model, but this job's model is {kind}")
        report_path, training_path = sibling(path, REPORT_SUFFIX), sibling(path, TRAINING_SUFFIX)
        for needed in (report_path, training_path):
            if not needed.is_file():
                raise InputError(f"{what}: {needed.name} is missing; keep the files a job writes together (the report "
                                 "names the model state it trained on, the training file its targets)")  # fmt: skip
        try:
            reports.append(json.loads(report_path.read_text("utf-8")))
        except ValueError as error:
            raise InputError(f"{what}: {report_path.name} is not readable JSON ({error})") from None
        loras.append(lora)
        digests.append(file_sha256(path))
    tensors, _ = read_safetensors(sibling(paths[-1], TRAINING_SUFFIX), "training file")
    missing = {"targets", "surrogates"} - set(tensors)
    if missing:
        raise InputError(f"the training file of {paths[-1].name} lacks {sorted(missing)}; it is not one a job wrote")
    return Earlier(list(paths), loras, digests, reports, tensors)
