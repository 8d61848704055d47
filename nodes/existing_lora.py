"""Instance Unlearn LoRA's ``existing_lora``: a request on a model that earlier requests unlearned.

The earlier result (the first request's LoRA, or the merged file of all requests so far,
``NAME.merged.safetensors``) is applied to the model first, so the new targets' noise, the
remember set and every regeneration are those of the model as it is served. Every target the
earlier result forgot must be among the run's targets (mark the new output into the same forget
set): they come first, and verified stopping judges them with the base-copy marks their own run
recorded, since the served model no longer makes them. The run's own LoRA is saved under its
name and the exact sum of both beside it (:func:`~unlearn_core.formats.lora.sum_of`), which on the
base model serves every request so far and is the ``existing_lora`` of the next one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.files import file_sha256
from ..unlearn_core.formats.lora import LoraWeights, load_lora, state_dict_for
from ..unlearn_core.serve.earlier import carried_marks
from . import paths
from .targets import UnlearnTargets


@dataclass(frozen=True)
class ExistingLora:
    """An earlier unlearning result read and checked against the model; nothing applied yet."""

    name: str
    path: Path
    weights: LoraWeights
    lora_model: dict[str, torch.Tensor]  # as LoraLoaderModelOnly applies the file
    sha256: str
    target_ids: list[str]
    forget_set: str | None
    verification: dict | None

    @classmethod
    def read(cls, name: str, base_model: str) -> ExistingLora:
        """Refuses a file this node did not write, or one trained on another model, before any work."""
        path = paths.existing_lora_path(name)
        weights = load_lora(path)
        metadata = weights.metadata
        if "unlearn.target_ids" not in metadata:
            raise InputError(f"existing_lora {name!r} is not a LoRA this node saved (it names no forgotten targets); "
                             "give the earlier request's LoRA or its .merged file, or [None]")  # fmt: skip
        trained_on = metadata.get("unlearn.base_model")
        if trained_on != base_model:
            raise InputError(f"existing_lora {name!r} was trained on {trained_on}, but this model is {base_model}: "
                             "connect the base model the earlier request trained on (without its LoRA applied)")  # fmt: skip
        try:
            ids = [str(i) for i in json.loads(metadata["unlearn.target_ids"])]
            verification = json.loads(metadata["unlearn.verification"]) if "unlearn.verification" in metadata else None
        except (ValueError, TypeError) as error:
            raise InputError(f"existing_lora {name!r} has damaged unlearning metadata ({error})") from None
        return cls(name, path, weights, state_dict_for(weights, "comfy"), file_sha256(path), ids,
                   metadata.get("unlearn.forget_set"), verification)  # fmt: skip

    def earlier_first(self, targets: UnlearnTargets) -> UnlearnTargets:
        """The targets with the earlier ones first, in their run's order (so their check marks line
        up); refuses when one is missing."""
        by_id = {target.id: target for target in targets.targets}
        missing = [i for i in self.target_ids if i not in by_id]
        if missing:
            where = f"forget set {self.forget_set!r}" if self.forget_set else "the earlier forget set"
            raise InputError(f"existing_lora {self.name!r} forgot {len(missing)} target(s) that are not among these "
                             f"targets ({', '.join(missing)}): mark the new output into {where}, so that every "
                             "earlier target stays forgotten")  # fmt: skip
        earlier = set(self.target_ids)
        return targets.with_targets([by_id[i] for i in self.target_ids] + [t for t in targets.targets if t.id not in earlier])

    def carried_marks(self, nearby: int) -> torch.Tensor:
        """The base-copy marks of the earlier targets (see :func:`~unlearn_core.serve.earlier.carried_marks`)."""
        return carried_marks(self.verification, len(self.target_ids), nearby, self.name)

    def refuse_overwrite(self, own: Path) -> None:
        """Refuses a lora_name whose own or merged file would be this earlier result: the line would
        lose the file it continues from (the node's default name is the same for every request)."""
        for written in (own, paths.merged_lora_path(own)):
            if written.resolve() == self.path.resolve():
                raise InputError(f"lora_name {paths.lora_name(own)!r} would overwrite existing_lora {self.name!r}, the result "
                                 "this request continues from: give each request its own lora_name (for example "
                                 "unlearn/request_2)")  # fmt: skip

    def record(self) -> dict:
        return {"file": self.name, "sha256": self.sha256}

