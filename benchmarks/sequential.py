"""Ten requests one after another on one model line, against stacking independent results and one
joint run: are all targets so far forgotten, how far have the other outputs moved from the
original base, and does a little ordinary fine-tuning bring a forgotten target back?

Every way unlearns the same ten targets, outputs a user would ask to remove (:func:`requests_for`:
flags, wrong flags of the three confusable prompts, so several requests come from one prompt; the
other models, their table candidates), in that order, with the library's defaults (verified
stopping on, the table's copy detector and threshold, surrogates by the library's bar). A request
the library refuses before training (its surrogate stays at or above the forgetting check's bar at
every edit tried, :meth:`Line.accepted`) is listed with the reason and the next candidate taken.
Three ways:

- **line** (what ``earlier`` in a job does, :mod:`unlearn_core.serve.earlier`): request k trains on
  the base with results 1..k-1 merged, its surrogate and remember set made by that served model,
  every earlier target kept in the forget set; every target is judged with the base-copy marks of
  the base model (an earlier result can change what the served model makes from a later target's
  noise: two of the ten share seed 778, and the question stays whether the base output is gone);
- **stack**: each request trained alone on the base, and the first k results summed
  (:func:`~unlearn_core.formats.lora.sum_of`, the same as loading them all at strength 1);
- **joint**: one run over all ten targets on the base (each target's remember set joined).

After each request (joint: after the tenth) the state is judged: each target so far regenerated
from its own noise and from nearby noises (slerp 0.05, 0.1, 0.2 towards fixed fresh noise) and
called forgotten when every regeneration is below the copy threshold; SSIM / PSNR of 64 held-out
seeds against the original base. The relearning probe: on each final state, a fresh LoRA trained
``--relearn-steps`` steps of ordinary denoising (the default learning rate, batch 8) on 48 other
outputs of that state; then every target regenerated from its own noise again (came back: it was
forgotten before, and its copy similarity is at or above the threshold again).

Every finished unit is one JSON line in ``benchmarks/results/sequential/<model>.jsonl`` (LoRAs
kept in ``.../loras/``, not committed); a rerun skips them. The report is
``benchmarks/results/sequential_<model>.json``.

    python benchmarks/sequential.py --threads 1                    # flags: about 25 minutes
    python benchmarks/sequential.py --model lshapes --threads 1    # a visible model
    python benchmarks/sequential.py --report                       # the table from the records
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from effectiveness import (
    FORGET_THRESHOLD,
    RESULTS,
    SETUPS,
    Bench,
    make_surrogate,
    similarity_to,
    write_json,
)

from unlearn_core import (
    ForgetTargets,
    RememberSet,
    UnlearnConfig,
    UnlearnData,
    load_lora,
    save_lora,
)
from unlearn_core.backends.diffusers_backend import (
    DiffusersDenoiser,
    lora_attached,
    unlearn_diffusers,
)
from unlearn_core.demo import models as demo_model
from unlearn_core.diffusion.noise import seeded_noise, slerp
from unlearn_core.diffusion.sampling import sample
from unlearn_core.errors import InputError
from unlearn_core.formats.apply import merged
from unlearn_core.formats.lora import sum_of
from unlearn_core.method.objectives import denoising_loss
from unlearn_core.method.stopping import sampler_check
from unlearn_core.verify.metrics import load_lpips
from unlearn_core.verify.preserve import evaluate

log = logging.getLogger("sequential")
RECORDS = RESULTS / "sequential"
REQUESTS = 10
SLERPS = (0.05, 0.1, 0.2)
RELEARN_OTHERS = 48


def unit(kind: str, targets) -> str:
    """A record's key: what it is and the targets it was made from, in order (a run over other
    requests never reads another's records)."""
    return kind + "_" + "_".join(f"{label}-{seed}" for label, seed in targets)


class Line:
    """One model's runs: records by key, LoRAs on disk, the data each request was made of."""

    def __init__(self, setup, config: UnlearnConfig, lpips_model, records: Path = RECORDS):
        self.setup, self.config, self.lpips_model = setup, config, lpips_model
        self.threshold = FORGET_THRESHOLD[setup.name]
        self.path = records / f"{setup.name}.jsonl"
        self.loras = records / "loras" / setup.name
        self.records = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record
        self.bench = Bench(setup, RESULTS / "effectiveness", config, setup.steps_sample, lpips_model, verified=True)
        seeds = RESULTS / "effectiveness" / f"{setup.name}_surrogate_seeds.json"
        if seeds.is_file():  # the surrogate seeds effectiveness chose
            self.bench.edit_seeds = json.loads(seeds.read_text())

    def base_outputs(self, targets) -> None:
        """The base model's targets, held-out seeds and their outputs, made before any state is merged."""
        for pair in targets:
            self.bench._data(tuple(pair), self.setup.steps_sample)

    def keep(self, record: dict, lora=None) -> dict:
        if lora is not None:
            self.loras.mkdir(parents=True, exist_ok=True)
            save_lora(self.loras / f"{record['key']}.safetensors", lora, "diffusers", {})
        self.records[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:  # one line per finished unit: a stop loses at most the one in flight
            handle.write(json.dumps(record) + "\n")
        log.info("%s %s: %s", self.setup.name, record["key"], {k: v for k, v in record.items() if k != "key" and not isinstance(v, list)})
        return record

    def lora(self, key: str):
        return load_lora(self.loras / f"{key}.safetensors")

    def forget_data(self, pair) -> ForgetTargets:
        """A request's target (the base model's output for the pair, the same in every way) and
        its surrogate as the model at hand makes it."""
        label, seed = pair
        target = self.bench._data(tuple(pair), self.setup.steps_sample)["target"]
        surrogate = make_surrogate(self.setup, "edit", target, label, self.bench.edit_seed(tuple(pair)),
                                   below=self.config.surrogate_below(self.threshold))  # the library's bar
        return ForgetTargets(target, surrogate, self.setup.cond([label]), seeded_noise([seed], tuple(target.shape[1:])))

    def remember_data(self, pair) -> RememberSet:
        """A request's remember set as the model at hand makes it: other seeds of its prompt and of the others."""
        remember_pairs = self.setup.remember_pairs(pair[0])
        return RememberSet(self.setup.generate(remember_pairs), self.setup.cond([p[0] for p in remember_pairs]))

    def accepted(self, targets, count: int) -> tuple[list, list[dict]]:
        """The requests training takes, and those the library refuses before any work (with why):
        one whose surrogate stays at or above the forgetting check's bar at every edit tried cannot
        be verified as forgotten, and Build Surrogate and the CLI refuse it
        (:func:`~unlearn_core.data.surrogate.away_from_copy`). The first ``count`` taken."""
        accepted, refused = [], []
        for pair in targets:
            if len(accepted) == count:
                break
            key = f"request_{pair[0]}-{pair[1]}"
            if key not in self.records:  # the verdict is kept: a rerun or --report builds no surrogate for it
                try:
                    self.forget_data(pair)
                    reason = None
                except InputError as error:
                    reason = str(error)
                self.keep({"key": key, "refused": reason})
            reason = self.records[key]["refused"]
            if reason is None:
                accepted.append(pair)
            else:
                refused.append({"target": list(pair), "reason": reason})
        return accepted, refused

    def request_data(self, pair) -> tuple[ForgetTargets, RememberSet]:
        return self.forget_data(pair), self.remember_data(pair)

    def base_marks(self, targets) -> torch.Tensor:
        """Which probes of each target the base model copies (the forgetting check's baseline on the
        base). A line request carries them for every target: an earlier result may already have
        changed what the served model makes from a later target's noise (two targets of one seed),
        and the question stays whether the base model's output is gone."""
        key = "base_marks_" + "_".join(f"{label}-{seed}" for label, seed in targets)
        if key not in self.records:
            forget = ForgetTargets.joined([self.forget_data(pair) for pair in targets])
            settings = self.bench.check_settings(self.setup.steps_sample)
            check = sampler_check(DiffusersDenoiser(self.setup.model, self.setup.process), self.setup.process, forget,
                                  settings, self.config.check_margin, self.config.check_nearby, self.config.seed)  # fmt: skip
            self.keep({"key": key, "counted": check.baseline().counted.tolist()})
        return torch.tensor(self.records[key]["counted"], dtype=torch.bool)

    def train(self, key: str, forget: ForgetTargets, remember: RememberSet, carried=None) -> dict:
        started = time.perf_counter()
        check = dataclasses.replace(self.bench.check_settings(self.setup.steps_sample), carried=carried)
        outcome = unlearn_diffusers(self.setup.model, self.setup.process, UnlearnData(forget, remember), self.config, check=check)
        verification = outcome.training.verification
        record = {"key": key, "steps": outcome.training.steps, "seconds": time.perf_counter() - started,
                  "forgotten_at": verification.get("forgotten_at"), "status": verification.get("status"),
                  "counted": verification.get("baseline", {}).get("counted")}  # fmt: skip
        return self.keep(record, outcome.lora)

    def line(self, targets) -> None:
        """Request k on the base with results 1..k-1 merged, every earlier target kept."""
        if all(unit("line", targets[:k]) in self.records for k in range(1, len(targets) + 1)):
            return  # recorded (the LoRAs themselves are not committed)
        marks = self.base_marks(targets)
        earlier: list[ForgetTargets] = []
        for k, pair in enumerate(targets, start=1):
            key = unit("line", targets[:k])
            applied = [self.lora(unit("line", targets[:i])) for i in range(1, k)]
            with merged(self.setup.model, sum_of(applied)) if applied else contextlib.nullcontext():
                forget = self.forget_data(pair)  # the later requests keep it, recorded or not
                if key not in self.records:
                    self.train(key, ForgetTargets.joined([*earlier, forget]), self.remember_data(pair), marks[:k])
            earlier.append(forget)

    def alone(self, targets) -> None:
        for pair in targets:
            if unit("alone", [pair]) not in self.records:
                forget, remember = self.request_data(pair)
                self.train(unit("alone", [pair]), forget, remember)

    def joint(self, targets) -> None:
        if unit("joint", targets) in self.records:
            return
        parts = [self.request_data(pair) for pair in targets]
        remember = RememberSet(torch.cat([r.samples for _, r in parts]),
                               {k: torch.cat([r.cond[k] for _, r in parts]) for k in parts[0][1].cond})  # fmt: skip
        self.train(unit("joint", targets), ForgetTargets.joined([f for f, _ in parts]), remember)

    def judge(self, key: str, loras: list, targets, label: str) -> dict:
        """Every target so far from its own and nearby noises, and 64 held-out seeds, on one state."""
        if key in self.records:
            return self.records[key]
        started = time.perf_counter()
        state = sum_of(loras)
        images = {}
        with merged(self.setup.model, state):
            denoiser = DiffusersDenoiser(self.setup.model, self.setup.process)
            similarity = []
            for pair in targets:
                label_index, seed = pair
                target = self.bench._data(tuple(pair), self.setup.steps_sample)["target"]  # the base model's output
                shape = tuple(target.shape[1:])
                own, fresh = seeded_noise([seed], shape), seeded_noise([seed + 7_919_000], shape)
                probes = [own, *(slerp(own, fresh, w) for w in SLERPS)]
                scores = []
                for noise in probes:
                    out = sample(denoiser, self.setup.process, noise, self.setup.cond([label_index]), self.setup.steps_sample,
                                 clip=self.setup.clip).clamp(-1, 1)  # fmt: skip
                    scores.append(similarity_to(self.setup, out, target))
                similarity.append(scores)
            entry = self.bench._data(tuple(targets[0]), self.setup.steps_sample)
            images["after_others"] = self.setup.generate(entry["integrity"])
        decoded = self.setup.to_images  # judged on images: a latent model's are decoded
        base_others = decoded(entry["base_others"])
        evaluation = evaluate(base_others[:1], base_others[:1], base_others, decoded(images["after_others"]),
                              self.setup.detector, self.threshold, self.lpips_model)  # fmt: skip
        forgotten = [all(s < self.threshold for s in scores) for scores in similarity]
        record = {"key": key, "way": label, "requests": len(targets), "forgotten": forgotten,
                  "all_forgotten": all(forgotten), "own_similarity": [round(s[0], 4) for s in similarity],
                  "worst_similarity": [round(max(s), 4) for s in similarity], "ssim": evaluation.integrity_ssim,
                  "psnr": evaluation.integrity_psnr, "seconds": time.perf_counter() - started}  # fmt: skip
        return self.keep(record)

    def relearn(self, key: str, loras: list, targets, steps: int) -> dict:
        """Ordinary fine-tuning of a fresh LoRA on other outputs of the state; which targets come back."""
        if key in self.records:
            return self.records[key]
        # the held-out seeds' prompts in turn, at seeds of their own
        others = [(label, 90_000 + s) for s, (label, _) in enumerate(self.setup.integrity_pairs(None)[:RELEARN_OTHERS])]
        generator = torch.Generator().manual_seed(0)
        with merged(self.setup.model, sum_of(loras)):
            data = self.setup.generate(others)
            cond = self.setup.cond([p[0] for p in others])
            with lora_attached(self.setup.model, self.config.lora_rank, seed=0) as lora:
                denoiser = lora.denoiser(self.setup.process, split=False)
                optimizer = torch.optim.AdamW(denoiser.trainable_parameters(), lr=self.config.learning_rate)
                for _ in range(steps):
                    index = torch.randint(len(data), (8,), generator=generator)
                    t = self.setup.process.sample_t(8, generator)
                    noise = torch.randn(data[index].shape, generator=generator)
                    batch_cond = {k: v[index] for k, v in cond.items()}
                    loss = denoising_loss(denoiser, self.setup.process, data[index], data[index], batch_cond, noise, t).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                weights = lora.weights()
            with lora_attached(self.setup.model, weights=weights):
                denoiser = DiffusersDenoiser(self.setup.model, self.setup.process)
                similarity = []
                for pair in targets:
                    target = self.bench._data(tuple(pair), self.setup.steps_sample)["target"]
                    out = sample(denoiser, self.setup.process, seeded_noise([pair[1]], tuple(target.shape[1:])),
                                 self.setup.cond([pair[0]]), self.setup.steps_sample, clip=self.setup.clip).clamp(-1, 1)  # fmt: skip
                    similarity.append(similarity_to(self.setup, out, target))
        return self.keep({"key": key, "steps": steps, "similarity": [round(s, 4) for s in similarity]})


def requests_for(line: Line, count: int) -> list[tuple[int, int]]:
    """At least ``count`` requests in order, or every candidate there is. Flags: wrong flags,
    outputs the classifier calls another flag, of the three confusable prompts (Ireland, Italy,
    Ivory Coast), seeds scanned in blocks of 1000, most confidently wrong first within a block
    (effectiveness' rule for block 0, which holds seven; its later candidates are correct flags,
    whose edits are the flag again). A block's wrong flags are kept as a record, so more requests
    only append. The other models: effectiveness' ranked targets (any output of a shapes model is
    one a user may ask to remove)."""
    setup = line.setup
    if setup.name != "flags":
        candidates = RESULTS / "effectiveness" / f"{setup.name}_candidates.json"  # effectiveness' ranked targets
        return [tuple(t) for t in json.loads(candidates.read_text())["candidates"]]
    trio = [setup.classes.index(name) for name in ("ireland", "italy", "ivory_coast")]
    found, block = [], 0
    while len(found) < count:
        key = f"wrong_flags_{1000 * block}-{1000 * block + 999}"
        if key not in line.records:
            scanned = [(label, seed) for label in trio for seed in range(1000 * block, 1000 * (block + 1))]
            predicted, confidence = demo_model.classify_flags(setup.classifier, setup.generate(scanned))
            wrong = [i for i, pair in enumerate(scanned) if int(predicted[i]) != pair[0]]
            wrong.sort(key=lambda i: -float(confidence[i]))
            line.keep({"key": key, "wrong": [list(scanned[i]) for i in wrong],
                       "seen_as": [setup.classes[int(predicted[i])] for i in wrong]})  # fmt: skip
        found += [tuple(pair) for pair in line.records[key]["wrong"]]
        block += 1
    return found


def report(line: Line, targets, relearn_steps: int, refused: list[dict]) -> dict:
    rows = {}
    for way in ("line", "stack"):
        rows[way] = [line.records.get(unit(f"judge_{way}", targets[:k])) for k in range(1, len(targets) + 1)]
    rows["joint"] = [line.records.get(unit("judge_joint", targets))]
    training = {"line": [line.records.get(unit("line", targets[:k])) for k in range(1, len(targets) + 1)],
                "alone": [line.records.get(unit("alone", [pair])) for pair in targets]}
    training["joint"] = [line.records.get(unit("joint", targets))]
    relearn = {}
    for way in ("line", "stack", "joint"):
        record, judged = line.records.get(unit(f"relearn_{way}_{relearn_steps}", targets)), rows[way][-1]
        if record is None or judged is None:
            continue
        # came back: forgotten (robustly) before the fine-tuning, copied again from its own noise after it
        back = [i for i, (gone, s) in enumerate(zip(judged["forgotten"], record["similarity"], strict=True))
                if gone and s >= line.threshold]  # fmt: skip
        relearn[way] = {"similarity": record["similarity"], "forgotten_before": sum(judged["forgotten"]),
                        "came_back": len(back), "came_back_targets": back}  # fmt: skip
    return {"model": line.setup.name, "requests": len(targets) + len(refused), "targets": [list(t) for t in targets],
            "refused": refused, "config": line.config.to_dict(),
            "threshold": line.threshold, "relearn_steps": relearn_steps, "judged": rows, "training": training,
            "relearn": relearn}  # fmt: skip


def print_table(result: dict) -> None:
    """After each request: targets so far forgotten (robustly), SSIM and PSNR of 64 held-out seeds
    against the original base, for each way (joint: after the last)."""
    print(f"{result['model']}: after each request, targets so far forgotten / SSIM / PSNR (dB) of 64 held-out seeds")
    for refused in result["refused"]:
        print(f"refused before training, so not among the requests below: {tuple(refused['target'])}: {refused['reason']}")
    print("| requests | line | line SSIM | line PSNR | stack | stack SSIM | stack PSNR | joint | joint SSIM | joint PSNR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    last = len(result["targets"])
    for k in range(1, last + 1):
        rows = [result["judged"]["line"][k - 1], result["judged"]["stack"][k - 1],
                result["judged"]["joint"][0] if k == last else None]  # fmt: skip
        cells = []
        for row in rows:
            cells += ["", "", ""] if row is None else [f"{sum(row['forgotten'])}/{k}", f"{row['ssim']:.3f}", f"{row['psnr']:.1f}"]
        print(f"| {k} | " + " | ".join(cells) + " |")
    for way, row in result["relearn"].items():
        print(f"relearning ({result['relearn_steps']} steps of ordinary fine-tuning on other outputs), {way}: "
              f"{row['came_back']} of the {row['forgotten_before']} forgotten targets came back")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flags", choices=sorted(SETUPS))
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--relearn-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only print the table from the records")
    parser.add_argument("--records", type=Path, default=RECORDS, help="where the records and LoRAs are kept")
    parser.add_argument("--out", type=Path, help="the report (default benchmarks/results/sequential_<model>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    setup = SETUPS[args.model]()
    line = Line(setup, UnlearnConfig(seed=0), load_lpips(), args.records)
    wanted = args.requests
    while True:  # the first --requests the library takes, in order (a refused one is listed, not trained)
        requests = requests_for(line, wanted)
        targets, refused = line.accepted(requests, args.requests)
        if len(targets) == args.requests or len(requests) < wanted:
            break
        wanted = len(requests) + args.requests - len(targets)
    line.base_outputs(targets)  # the requests taken, before any state is merged
    if not args.report:
        line.line(targets)
        line.alone(targets)
        line.joint(targets)
        joint = unit("joint", targets)
        states = {}  # key -> (the results that make the state, the targets it is judged on, the way)
        for k in range(1, len(targets) + 1):
            states[unit("judge_line", targets[:k])] = ([unit("line", targets[:i]) for i in range(1, k + 1)], targets[:k], "line")
            states[unit("judge_stack", targets[:k])] = ([unit("alone", [t]) for t in targets[:k]], targets[:k], "stack")
        states[unit("judge_joint", targets)] = ([joint], targets, "joint")
        for key, (results, judged, way) in states.items():
            if key not in line.records:  # the LoRAs are read only for what is still to judge
                line.judge(key, [line.lora(r) for r in results], judged, way)
        for way, results in (("line", states[unit("judge_line", targets)][0]),
                             ("stack", states[unit("judge_stack", targets)][0]), ("joint", [joint])):  # fmt: skip
            key = unit(f"relearn_{way}_{args.relearn_steps}", targets)
            if key not in line.records:
                line.relearn(key, [line.lora(r) for r in results], targets, args.relearn_steps)
    result = report(line, targets, args.relearn_steps, refused)
    write_json(args.out or RESULTS / f"sequential_{args.model}.json", {"date": time.strftime("%Y-%m-%d"), **result})
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
