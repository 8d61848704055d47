"""Unlearning on your own diffusers model, outside ComfyUI, from a JSON job file.

A job names a model (a diffusers pipeline folder, or a model folder; see
:mod:`unlearn_core.formats.model_folders`), a safetensors file with the targets in the model's input space
and their conditioning, optionally surrogates and a remember set, the training config, and the
output::

    {
      "model": {"path": "sd35/transformer", "kind": "sd3", "shift": 3.0},
      "targets": "targets.safetensors",
      "surrogate": {"method": "sdedit", "strength": 0.5, "steps": 28},
      "remember": {"generate": 32, "steps": 28},
      "config": {"steps": 100, "learning_rate": 1e-4, "lora_rank": 16},
      "output": "forget_target.safetensors",
      "key_format": "comfy"
    }

The targets file holds ``targets`` (N, C, H, W), optionally ``surrogates`` of the same shape and
``remember`` (M, C, H, W), optionally ``noise`` (N, C, H, W), and conditioning tensors with a
batch dimension of N (for the targets) and, prefixed with ``remember.``, of M. Targets are latents
as the network takes them (after the VAE's scaling and shift); Flux and Qwen-Image latents
unpacked, (N, 16, H, W) with H and W even (the backend packs 2x2 patches as their pipelines do;
Qwen-Image's frame axis of one left out). The conditioning by ``model.kind``
(:data:`~unlearn_core.backends.diffusers_backend.CONDITIONING`; any other name is refused):

- ``sd3``: ``encoder_hidden_states`` (N, L, 4096) and ``pooled_projections`` (N, 2048);
- ``flux``: ``encoder_hidden_states`` (N, L, 4096; T5), ``pooled_projections`` (N, 768; CLIP),
  and for Flux.1 dev (``guidance_embeds``) ``guidance`` (N,), the guidance scale the target was
  sampled with (FluxPipeline's ``guidance_scale``, 3.5 by default); schnell takes no guidance;
- ``qwen_image``: ``encoder_hidden_states`` (N, L, 3584), optionally
  ``encoder_hidden_states_mask`` (N, L; 1 for prompt tokens, 0 for padding);
- ``unet``: nothing, or ``class_labels`` (N,) for a class-conditional UNet;
- ``unet_cond``: ``encoder_hidden_states`` (N, 77, 768 for SD1.5, 1024 for SD2, 2048 for SDXL),
  and for SDXL ``text_embeds`` (N, 1280) and ``time_ids`` (N, 6; original size, crop corner,
  target size, as StableDiffusionXLPipeline builds them).

``key_format`` defaults to ``comfy``, keys ComfyUI's stock LoRA loader maps onto its model (SD3's
fused MMDiT names, Qwen-Image's own, kohya names for SD1.5 / SDXL; :mod:`unlearn_core.formats.lora`), and
to ``diffusers`` for Flux, whose ComfyUI layers fuse what diffusers keeps apart (ComfyUI's loader
reads Flux's diffusers keys; a 'comfy' Flux job is refused before any work). Relative paths are
read from the job file's folder; the output path must stay inside the output folder.

**Each target's noise** (what its sampler started from) is what verified stopping regenerates it
from, and what ours draws its forget points around. The convention is the core sampler's
(:func:`~unlearn_core.diffusion.sampling.sample`): the tensor the sampler starts at, at noise fraction 1
(for a seed s, ``torch.randn((C, H, W), generator=torch.Generator().manual_seed(s))``,
:func:`~unlearn_core.diffusion.sampling.seeded_noise`). Give it as ``noise`` in the targets file, or as the
job's ``"seeds": [s0, s1, ...]`` (one per target); without either, it is recovered by inverting
the deterministic sampler (:func:`~unlearn_core.diffusion.sampling.invert`). Whichever way, the job
regenerates each target from its noise and the report says, per target, where the noise came
from and whether it reproduces the target (copy similarity); a target it does not reproduce
cannot be verified forgotten, and the report says so.

The job's ``"check"`` says how a regeneration is judged: ``detector`` (``"pixel"``, the offline
proxy, or the path of an SSCD TorchScript file), ``forget_below`` (the copy-similarity threshold:
0.6 for the pixel proxy, the paper's 0.4 for SSCD) and ``steps`` (the sampler steps of each
regeneration; default the remember set's). The same detector refuses surrogates that are copies of
their target: a generated one is rebuilt (other edit seeds, then stronger edits), a given one is
refused.

A job writes, next to its output ``NAME.safetensors`` (a LoRA, or with ``adapter: "full"`` every
weight of the fine-tuned model, see :mod:`unlearn_core.formats.full_weights`):

- ``NAME.training.safetensors``: the targets, surrogates and remember set it trained on, with
  their conditioning, in the targets-file format (give it as ``targets`` to train on exactly
  the same data again);
- ``NAME.preview.png``: targets, surrogates and remember samples (:mod:`unlearn_core.verify.previews`);
- ``NAME.report.json``: the result, the sample ranges, and the sha256 of every file; written
  last, so a report means the other files are complete.

With ``"earlier": [...]`` (the results of earlier requests, oldest first) the job continues a
model line (:mod:`unlearn_core.serve.earlier`): it trains on the base with those results merged,
keeps their targets in its forget set, writes ``NAME.merged.safetensors`` (the line as one LoRA)
and records the model state it trained on and the one it makes.

Nothing is written unless training succeeds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends.diffusers_backend import DiffusersDenoiser, unlearn_diffusers
from ..data.remember import RememberRequest, generate_remember
from ..data.seeds import UNRECORDED_SEED
from ..data.sets import ForgetTargets, RememberSet, UnlearnData
from ..data.surrogate import away_from_copy, build_surrogate
from ..diffusion.noise import seeded_noise
from ..diffusion.process import ForwardProcess
from ..diffusion.sampling import DenoiserSampler, invert, sample
from ..errors import InputError
from ..formats.apply import in_model_names, merged
from ..formats.files import (
    atomic_path,
    atomic_write_text,
    file_sha256,
    job_path,
    read_safetensors,
    safe_child,
    safe_name,
    sibling,
    tensor_hash,
)
from ..formats.full_weights import save_full_weights
from ..formats.lora import (
    KEY_FORMATS,
    check_key_format,
    default_key_format,
    reproduction_metadata,
    safetensors_bytes,
    save_lora,
    sum_of,
)
from ..formats.model_folders import LoadedModel, ModelCache, ModelSource, locate
from ..method.config import UnlearnConfig
from ..method.stopping import CheckSettings
from ..verify.metrics import (
    CopyDetector,
    PixelCopyDetector,
    TorchScriptCopyDetector,
    copy_similarity,
)
from ..verify.previews import save_training_preview
from .earlier import REPORT_SUFFIX, TRAINING_SUFFIX, Earlier, model_state, read_earlier

__all__ = ["run_job", "plan_job", "output_file", "JobPlan", "OUTPUT_SUFFIXES"]

log = logging.getLogger(__name__)
KNOWN_KEYS = {"model", "targets", "surrogate", "remember", "config", "output", "key_format", "seeds", "check", "earlier", "line"}
DEFAULT_OUTPUT = "unlearn_lora.safetensors"
SURROGATE_KEYS = {"method", "strength", "steps", "seed"}
REMEMBER_KEYS = {"generate", "steps"}
CHECK_KEYS = {"detector", "forget_below", "steps"}
#: the copy-similarity threshold of each detector when the job gives none
FORGET_BELOW = {"pixel": 0.6, "sscd": 0.4}
#: the files a job writes beside its output, by role
OUTPUT_SUFFIXES = {"training": TRAINING_SUFFIX, "preview": ".preview.png", "report": REPORT_SUFFIX,
                   "merged": ".merged.safetensors"}  # fmt: skip


def _section(value, what: str, known: set[str] | None = None) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"the job's {what!r} must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - known) if known is not None else []
    if unknown:
        raise InputError(f"unknown {what} keys {unknown}; known: {sorted(known)}")
    return value


def _number(spec: dict, key: str, default, kind, what: str, low, high):
    """``spec[key]`` as int or float within [low, high], or an error naming the field and its range."""
    value = spec.get(key, default)
    whole = isinstance(value, int) and not isinstance(value, bool)
    finite = isinstance(value, float) and math.isfinite(value)
    if not (whole or (finite and (kind is float or value.is_integer()))):
        raise InputError(f"{what}.{key}={value!r} must be a {'whole ' if kind is int else ''}number in [{low}, {high}]")
    if not low <= value <= high:
        raise InputError(f"{what}.{key}={value!r} is outside [{low}, {high}]; give a value in that range")
    return kind(value)


@dataclass
class JobPlan:
    """A checked job: every value validated and every path resolved; nothing loaded yet."""

    job: dict
    config: UnlearnConfig
    key_format: str
    output: Path
    source: ModelSource
    targets_path: Path
    surrogate: dict  # method, strength, steps, seed
    remember: dict  # generate, steps
    check: dict  # detector ("pixel" or a TorchScript path), forget_below, steps
    seeds: list[int] | None = None  # each target's sampler seed, when the job gives them
    earlier: list[Path] = field(default_factory=list)  # earlier results of the model line, oldest first

    def sibling(self, role: str) -> Path:
        """The path of one of the files written beside the output (see OUTPUT_SUFFIXES)."""
        return sibling(self.output, OUTPUT_SUFFIXES[role])


def output_file(job: dict, out_dir: Path) -> Path:
    """Where a job writes its result (its ``output`` inside ``out_dir``)."""
    return safe_child(out_dir, job.get("output", DEFAULT_OUTPUT), ".safetensors", what="output name")


def plan_job(job: dict, base_dir: Path, out_dir: Path | None = None) -> JobPlan:
    """Validate a job against the files on disk (configs only, no weights), before any work."""
    job = _section(job, "job")
    unknown = sorted(set(job) - KNOWN_KEYS)
    if unknown:
        raise InputError(f"unknown job keys {unknown}; known: {sorted(KNOWN_KEYS)}")
    config = UnlearnConfig.from_dict(_section(job.get("config", {}), "config"))
    key_format = job.get("key_format")
    if key_format is not None and key_format not in KEY_FORMATS:
        raise InputError(f"key_format={key_format!r} is not one of: {', '.join(KEY_FORMATS)}")
    if config.adapter == "full" and "key_format" in job:
        raise InputError("key_format names LoRA key layouts, but adapter 'full' writes every weight under the model's own "
                         "diffusers names: remove key_format from the job")  # fmt: skip
    output = output_file(job, out_dir or base_dir)
    surrogate_spec = _section(job.get("surrogate", {"method": "sdedit"}), "surrogate", SURROGATE_KEYS)
    remember_spec = _section(job.get("remember", {"generate": 32}), "remember", REMEMBER_KEYS)
    surrogate = {
        "method": surrogate_spec.get("method", "sdedit"),
        "strength": _number(surrogate_spec, "strength", 0.5, float, "surrogate", 0.01, 1.0),
        "steps": _number(surrogate_spec, "steps", 28, int, "surrogate", 1, 1000),
        "seed": _number(surrogate_spec, "seed", 0, int, "surrogate", 0, 2**63 - 1),
    }
    remember = {
        "generate": _number(remember_spec, "generate", 32, int, "remember", 1, 10_000),
        "steps": _number(remember_spec, "steps", 28, int, "remember", 1, 1000),
    }
    check_spec = _section(job.get("check", {}), "check", CHECK_KEYS)
    detector = check_spec.get("detector", "pixel")
    if not isinstance(detector, str) or not detector:
        raise InputError(f"check.detector={detector!r} must be 'pixel' or the path of an SSCD TorchScript file")
    if detector != "pixel":
        detector = str(job_path(base_dir, detector, "check.detector"))
    default_below = FORGET_BELOW["pixel" if detector == "pixel" else "sscd"]
    check = {
        "detector": detector,
        "forget_below": _number(check_spec, "forget_below", default_below, float, "check", 0.01, 1.0),
        "steps": _number(check_spec, "steps", remember["steps"], int, "check", 1, 1000),
    }
    seeds = job.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in seeds)):  # fmt: skip
        raise InputError(f"seeds={seeds!r} must be a list of whole numbers in [0, 2^63), one per target")
    if "line" in job:
        safe_name(job["line"] if isinstance(job["line"], str) else "", "line name")
        if "earlier" in job:
            raise InputError("a request of a model line gets its earlier results from the queue: give 'line' or "
                             "'earlier', not both")  # fmt: skip
    earlier = job.get("earlier", [])
    if not isinstance(earlier, list) or not all(isinstance(v, str) and v for v in earlier):
        raise InputError(f"earlier={earlier!r} must be a list of the result files of earlier requests, oldest first")
    if earlier and config.adapter == "full":
        raise InputError("a request continues from earlier results by training a LoRA on top of them: use adapter 'lora'")
    earlier = [job_path(base_dir, value, f"earlier[{index}]") for index, value in enumerate(earlier)]
    targets_path = job_path(base_dir, job.get("targets"), "targets")
    source = locate(job.get("model", {}), base_dir)
    key_format = key_format or default_key_format(source.kind)
    if config.adapter != "full":
        check_key_format(source.kind, key_format)  # before any work, not after training
    return JobPlan(job, config, key_format, output, source, targets_path, surrogate, remember, check, seeds, earlier)


def _read_targets(plan: JobPlan) -> dict[str, torch.Tensor]:
    tensors, _ = read_safetensors(plan.targets_path, "targets file", "write it with safetensors.torch.save_file")
    if "targets" not in tensors:
        raise InputError("the targets file needs a 'targets' tensor (N, C, H, W) in the model's input space")
    targets = tensors["targets"]
    if targets.dim() != 4 or len(targets) == 0:
        raise InputError(f"'targets' must be a non-empty (N, C, H, W) batch, got shape {tuple(targets.shape)}; put at least one target in the file")
    if not torch.isfinite(targets).all():
        raise InputError("'targets' holds NaN/inf values; re-encode the target images")  # before sampling from them
    if "surrogates" not in tensors and plan.surrogate["method"] != "sdedit":
        raise InputError("without surrogates in the targets file, surrogate.method must be 'sdedit'")
    if "surrogates" in tensors and tensors["surrogates"].shape != targets.shape:
        raise InputError(f"surrogates {tuple(tensors['surrogates'].shape)} do not match targets {tuple(targets.shape)}; "
                         "build one surrogate per target at the target's size")  # fmt: skip
    if "noise" in tensors:
        if plan.seeds is not None:
            raise InputError("the targets file holds 'noise' and the job gives 'seeds': give each target's noise one way")
        if tensors["noise"].shape != targets.shape:
            raise InputError(f"'noise' {tuple(tensors['noise'].shape)} must match 'targets' {tuple(targets.shape)}: the "
                             "noise each target's sampler started from")  # fmt: skip
    if plan.seeds is not None and len(plan.seeds) != len(targets):
        raise InputError(f"the job gives {len(plan.seeds)} seeds for {len(targets)} targets; give one per target")
    return {key: value.float() for key, value in tensors.items()}


def _detector(plan: JobPlan) -> CopyDetector:
    return PixelCopyDetector() if plan.check["detector"] == "pixel" else TorchScriptCopyDetector(plan.check["detector"])


def _target_noise(denoiser, process: ForwardProcess, plan: JobPlan, targets: torch.Tensor, cond: dict,
                  given: torch.Tensor | None, clip: float | None, detector: CopyDetector) -> tuple[torch.Tensor, list[dict]]:  # fmt: skip
    """Each target's sampler noise (given, from its seed, or recovered by inversion) and a record
    per target: where it came from and whether the model regenerates the target from it."""
    shape, steps = tuple(targets.shape[1:]), plan.check["steps"]
    if given is not None:
        noise, sources = given.to(targets), [{"source": "given in the targets file"} for _ in targets]
    elif plan.seeds is not None:
        noise = seeded_noise(plan.seeds, shape).to(targets)
        sources = [{"source": "seed", "seed": seed} for seed in plan.seeds]
    else:
        noise = invert(denoiser, process, targets, cond, steps, clip)
        sources = [{"source": f"recovered by inverting the sampler ({steps} steps)"} for _ in targets]
    again = sample(denoiser, process, noise, cond, steps, clip=clip)
    similarity = copy_similarity(detector, again.float(), targets.float()).tolist()
    for index, (record, score) in enumerate(zip(sources, similarity, strict=True)):
        record.update(copy_similarity_of_regeneration=score, reproduces=score >= plan.check["forget_below"])
        if not record["reproduces"]:
            record["note"] = ("the model does not regenerate this target from this noise, so forgetting it cannot be "
                              "verified: give the seed or noise its sampler started from")  # fmt: skip
        if not record["reproduces"] and not plan.config.stop_when_forgotten:  # else the check's baseline says it
            log.warning("target %d: %s (copy similarity %.3f < %g; noise %s)", index, record["note"], score,
                        plan.check["forget_below"], record["source"])  # fmt: skip
    return noise, sources


def _check_range(what: str, samples: torch.Tensor, clip: float | None, targets: torch.Tensor) -> dict:
    """Where generated samples lie, and a warning when they leave the data's range.

    The data's range is [-clip, clip] when the sampler clips, else the targets' range widened
    by half its span on each side (an unclipped pixel DDPM that diverges leaves it by orders
    of magnitude, and training on such samples destroys integrity).
    """
    low, high = float(samples.min()), float(samples.max())
    if clip is not None:
        allowed = (-clip, clip)
    else:
        t_low, t_high = float(targets.min()), float(targets.max())
        margin = 0.5 * max(t_high - t_low, 1e-6)
        allowed = (t_low - margin, t_high + margin)
    inside = allowed[0] - 1e-6 <= low and high <= allowed[1] + 1e-6
    if not inside:
        log.warning("generated %s range from %.4g to %.4g, outside the data's range [%.4g, %.4g]: the sampler diverges "
                    "without x0 clipping; set model.clip (1.0 for pixel models in [-1, 1]) or give them in the targets "
                    "file", what, low, high, *allowed)  # fmt: skip
    return {"min": low, "max": high, "data_range": list(allowed), "inside": inside}


def _training_data(loaded: LoadedModel, process: ForwardProcess, plan: JobPlan,
                   tensors: dict[str, torch.Tensor]) -> tuple[UnlearnData, dict, list[dict], CopyDetector]:  # fmt: skip
    """The forget targets with surrogates (none a copy of its target) and their noise, and the
    remember set: given, or sampled from the model. Also the sample ranges, a record per target
    (its noise's source, its surrogate's rebuilds) and the check's copy detector."""
    model, source = loaded.model, loaded.source
    device = next(model.parameters()).device
    targets = tensors["targets"].to(device)
    forget_cond = {k: v.to(device) for k, v in tensors.items()
                   if k not in ("targets", "surrogates", "remember", "noise") and not k.startswith("remember.")}  # fmt: skip
    denoiser = DiffusersDenoiser(model, process)
    detector = _detector(plan)
    copy_at = plan.config.surrogate_below(plan.check["forget_below"])  # the check must be able to call the surrogate forgotten

    def similarity(surrogate, target):
        return float(copy_similarity(detector, surrogate.float(), target.float())[0])

    ranges, notes = {}, {}
    if "surrogates" in tensors:
        surrogates = tensors["surrogates"].to(device)
        for index in range(len(targets)):
            score = similarity(surrogates[index : index + 1], targets[index : index + 1])
            if score >= copy_at:
                raise InputError(f"given surrogate {index} is (near) a copy of its target (copy similarity {score:.3f} >= "
                                 f"{copy_at:g}, the forgetting check's bar, with the {plan.check['detector']} detector): "
                                 "training towards it cannot make the check call the target forgotten; edit it more, or "
                                 "leave surrogates out to have them generated")  # fmt: skip
    else:
        spec = plan.surrogate
        sampler = DenoiserSampler(denoiser, process, spec["steps"], source.clip)
        built = []
        for index in range(len(targets)):
            target, prompt = targets[index : index + 1], {k: v[index : index + 1] for k, v in forget_cond.items()}

            def make(strength, seed, target=target, prompt=prompt):
                return build_surrogate(spec["method"], target, sampler=sampler, prompt=prompt, strength=strength, seed=seed)

            surrogate, notes[index] = away_from_copy(make, target, similarity, copy_at, spec["strength"], spec["seed"],
                                                     f"the surrogate of target {index}")  # fmt: skip
            built.append(surrogate)
        surrogates = torch.cat(built)
        ranges["surrogates"] = _check_range("surrogates", surrogates, source.clip, targets)
    noise, noise_records = _target_noise(denoiser, process, plan, targets, forget_cond, tensors.get("noise"), source.clip, detector)
    if "remember" in tensors:
        remember = tensors["remember"].to(device)
        remember_cond = {k.removeprefix("remember."): v.to(device) for k, v in tensors.items() if k.startswith("remember.")}
    else:
        count = plan.remember["generate"]
        picks = torch.arange(count) % len(targets)  # other seeds of the targets' own conditioning, in turn
        remember_cond = {k: v[picks.to(v.device)] for k, v in forget_cond.items()}
        sampler = DenoiserSampler(denoiser, process, plan.remember["steps"], source.clip)
        # a targets file records no seeds: the seed rule's remember seeds of an unrecorded one
        request = RememberRequest(remember_cond, UNRECORDED_SEED, count)
        remember, _ = generate_remember(sampler, [request], tuple(targets.shape[1:]))
        ranges["remember"] = _check_range("remember samples", remember, source.clip, targets)
    data = UnlearnData(ForgetTargets(targets, surrogates, forget_cond, noise), RememberSet(remember, remember_cond))
    targets_record = [{"noise": noise_records[index], **({"surrogate": notes[index]} if index in notes else {})}
                      for index in range(len(targets))]  # fmt: skip
    return data, ranges, targets_record, detector


def _with_earlier(data: UnlearnData, earlier: Earlier) -> UnlearnData:
    """Every earlier target first, then the new ones: the forget set keeps them all forgotten."""
    new = data.forget
    old = earlier.forget_targets(new.targets.device, set(new.cond), tuple(new.targets.shape[1:]))
    if (old.noise is None) != (new.noise is None):
        raise InputError(f"the training file of {earlier.paths[-1].name} holds no noise: its targets cannot be "
                         "regenerated; it is not one a job wrote")  # fmt: skip
    return UnlearnData(ForgetTargets.joined([old, new]), data.remember)


def _write_training_file(path: Path, data: UnlearnData, metadata: dict[str, str]) -> None:
    """The training data in the targets-file format (sorted keys: the same data gives the same bytes)."""
    tensors = {"targets": data.forget.targets, "surrogates": data.forget.surrogates, "remember": data.remember.samples}
    if data.forget.noise is not None:
        tensors["noise"] = data.forget.noise
    tensors.update(data.forget.cond)
    tensors.update({f"remember.{key}": value for key, value in data.remember.cond.items()})
    tensors = {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as temporary:
        temporary.write_bytes(safetensors_bytes(tensors, metadata))


def run_job(
    job: dict,
    base_dir: Path,
    callback=None,
    *,
    out_dir: Path | None = None,
    models: ModelCache | None = None,
    should_stop=None,
) -> dict:
    """Run one job: validate everything, load the model (or take it from ``models``), build the
    training data, train, then write the outputs (nothing is written if any step fails).

    ``out_dir`` (default ``base_dir``) is the folder the output name is taken in; queue workers
    pass their request's output folder and a :class:`ModelCache` that keeps the model loaded.
    """
    plan = plan_job(job, Path(base_dir), None if out_dir is None else Path(out_dir))
    if "line" in job:  # the queue turns a line into the earlier results it names
        raise InputError(f"this job belongs to model line {job['line']!r}, whose earlier results the request queue knows: "
                         "submit it with `unlearn queue`, or give its earlier results as 'earlier' to run it alone")  # fmt: skip
    tensors = _read_targets(plan)
    earlier = read_earlier(plan.earlier, plan.source.kind) if plan.earlier else None
    carried = earlier.carried_marks(plan.config.check_nearby) if earlier and plan.config.stop_when_forgotten else None
    loaded, loaded_now = (models or ModelCache()).get(plan.source)
    earlier_sha256 = earlier.sha256 if earlier else []
    if earlier:
        earlier.check_chain(loaded.fingerprint)
    latent_size = tuple(tensors["targets"].shape[-2:])  # a resolution-dependent flow shift is the targets' one
    process = loaded.source.process(next(loaded.model.parameters()).device, latent_size)
    applied = [in_model_names(lora, loaded.model) for lora in earlier.loras] if earlier else []
    # the model as it is served: every earlier result merged for this job, the cached weights restored after
    with merged(loaded.model, sum_of(applied)) if applied else contextlib.nullcontext():
        data, ranges, targets_record, detector = _training_data(loaded, process, plan, tensors)
        if earlier:
            data = _with_earlier(data, earlier)
            targets_record = [{"earlier": plan.earlier[-1].name}] * earlier.targets + targets_record
        check = CheckSettings(detector, plan.check["forget_below"], plan.check["steps"], loaded.source.clip, carried=carried)
        outcome = unlearn_diffusers(loaded.model, process, data, plan.config, callback=callback, should_stop=should_stop,
                                    check=check)  # fmt: skip

    given_remember = "remember" in tensors
    remember_source = {"given": tensor_hash(data.remember.samples.cpu())} if given_remember else dict(plan.remember)
    surrogate_source = "given" if "surrogates" in tensors else dict(plan.surrogate)
    model_spec = plan.job["model"]
    metadata = reproduction_metadata(
        plan.config, data, str(model_spec.get("path")), base_model_kind=loaded.source.kind, surrogate=surrogate_source, remember=remember_source,
    )  # fmt: skip
    if loaded.source.clip is not None:
        metadata["unlearn.sample_clip"] = json.dumps(loaded.source.clip)
    trained_on = model_state(loaded.fingerprint, earlier_sha256)
    metadata["unlearn.model_state"] = trained_on["sha256"]

    training, preview, report = plan.sibling("training"), plan.sibling("preview"), plan.sibling("report")
    _write_training_file(training, data, {"unlearn.surrogate": json.dumps(surrogate_source, sort_keys=True),
                                          "unlearn.remember": json.dumps(remember_source, sort_keys=True)})  # fmt: skip
    save_training_preview(preview, data.forget.targets, data.forget.surrogates, data.remember.samples)
    if outcome.finetuned is not None:
        weights = save_full_weights(plan.output, outcome.finetuned.to("cpu"), metadata)
    else:
        weights = save_lora(plan.output, outcome.lora, plan.key_format, metadata)
    files = {path.name: file_sha256(path) for path in (weights, training, preview)}
    result_state = model_state(loaded.fingerprint, [*earlier_sha256, files[weights.name]])
    if earlier:  # one file for the whole line: the exact sum of every result so far
        merged_metadata = {**metadata, "unlearn.model_state": result_state["sha256"],
                           "unlearn.merged_of": json.dumps([*(p.name for p in plan.earlier), weights.name])}  # fmt: skip
        line_file = save_lora(plan.sibling("merged"), sum_of([*applied, outcome.lora]), plan.key_format, merged_metadata)
        files[line_file.name] = file_sha256(line_file)
    final = outcome.training.final
    result = {
        "lora": str(weights),
        "adapter": plan.config.adapter,
        "key_format": None if plan.config.adapter == "full" else plan.key_format,
        "steps": outcome.training.steps,
        "seconds": outcome.training.seconds,
        "final_forget_loss": final.get("forget_loss"),
        "final_remember_loss": final.get("remember_loss"),
        "model_loaded": loaded_now,
        "targets_sha256": file_sha256(plan.targets_path),
        "samples": {"clip": loaded.source.clip, **ranges},
        "targets": targets_record,
        "check": {**plan.check, "measure": f"copy similarity ({detector.name}) of a regeneration to its target"},
        "verification": outcome.training.verification,
        "files": files,
        "model_state": trained_on,
        "result_state": result_state,
        "earlier": [{"file": path.name, "sha256": digest} for path, digest in zip(plan.earlier, earlier_sha256, strict=True)],
    }
    base_model = {**loaded.source.describe(latent_size), "files_sha256": loaded.fingerprint}
    atomic_write_text(report, json.dumps({**result, "report": report.name, "base_model": base_model}, indent=2, sort_keys=True))
    return {**result, "report": str(report)}
