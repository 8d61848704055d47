"""Where a marked image came from, read from the graph of the running prompt (ComfyUI's hidden
``prompt``: the API-format graph, node id -> class and inputs; named ``graph`` here, since the
samplers' conditioning is what the core calls a prompt).

The walk goes upstream from the image input through decode nodes to the first sampler, then
from the sampler's model input to its loader, and records the settings that reproduce the
output (seed, steps, sampler, scheduler, cfg, denoise, model file).
"""

from __future__ import annotations

SAMPLER_FIELDS = ("seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")
LOADER_FIELDS = ("unet_name", "ckpt_name", "model_name")
MAX_HOPS = 64


def _link(value) -> str | None:
    """A linked input is [node_id, output_index]."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0])
    return None


def _resolve(graph: dict, value, hops: int = 0):
    """A widget value, following links to primitive nodes (e.g. a seed node)."""
    source = _link(value)
    if source is None or hops > MAX_HOPS:
        return value
    node = graph.get(source, {})
    inputs = node.get("inputs", {})
    for key in ("value", "seed", "noise_seed", "int", "float", "string"):
        if key in inputs:
            return _resolve(graph, inputs[key], hops + 1)
    return None


def _upstream(graph: dict, node_id: str, want) -> tuple[str, dict] | None:
    """Breadth-first search from ``node_id`` (itself included) upstream for the first want(node)."""
    seen, queue = set(), [node_id]
    while queue and len(seen) < MAX_HOPS * 8:
        current = queue.pop(0)
        if current in seen or current not in graph:
            continue
        seen.add(current)
        node = graph[current]
        if want(node):
            return current, node
        for value in node.get("inputs", {}).values():
            source = _link(value)
            if source is not None:
                queue.append(source)
    return None


def _is_sampler(node: dict) -> bool:
    inputs = node.get("inputs", {})
    return "Sampler" in node.get("class_type", "") and ("seed" in inputs or "noise_seed" in inputs or "noise" in inputs)


def _is_loader(node: dict) -> bool:
    return any(field in node.get("inputs", {}) for field in LOADER_FIELDS)


def from_graph(graph: dict | None, node_id: str | None, input_name: str = "images") -> dict:
    """Provenance of what feeds ``input_name`` of node ``node_id`` (an empty dict if unknown)."""
    if not graph or node_id is None or str(node_id) not in graph:
        return {}
    node_id = str(node_id)
    source = _link(graph[node_id].get("inputs", {}).get(input_name))
    if source is None:
        return {}
    found = _upstream(graph, source, _is_sampler)
    if found is None:
        return {"source_node": source, "source_class": graph.get(source, {}).get("class_type")}
    sampler_id, sampler = found
    inputs = sampler.get("inputs", {})
    result = {"sampler_node": sampler_id, "sampler_class": sampler.get("class_type"),
              "negative_linked": _link(inputs.get("negative")) is not None}  # fmt: skip
    for field in SAMPLER_FIELDS:
        if field in inputs:
            value = _resolve(graph, inputs[field])
            if value is not None:
                result["seed" if field == "noise_seed" else field] = value
    loader = _upstream(graph, sampler_id, _is_loader)
    if loader is not None:
        for field in LOADER_FIELDS:
            if field in loader[1].get("inputs", {}):
                result["model"] = _resolve(graph, loader[1]["inputs"][field])
    return result


def replay_problems(provenance: dict) -> list[str]:
    """What keeps a regeneration from its seed from replaying the marked output, as far as the
    recorded provenance tells (the base model's regeneration is the proof; this says why not)."""
    problems = []
    if provenance.get("seed") is None:
        problems.append("no seed was recorded (marked without its sampler graph)")
    cfg = provenance.get("cfg")
    if not provenance.get("negative_recorded") and provenance.get("negative_linked") and cfg not in (None, 1, 1.0):
        problems.append(
            f"the sampler used a negative prompt at cfg {cfg} that was not recorded: connect the sampler's "
            "negative conditioning to Mark Undesired Output, then mark the output again (in a new forget set, "
            "or after removing it from this one)"
        )
    denoise = provenance.get("denoise")
    if denoise is not None and float(denoise) < 1.0:
        problems.append(f"the sampler ran at denoise {denoise} from an input image, which a seed alone cannot replay")
    if provenance.get("sampler_class") not in (None, "KSampler", "KSamplerAdvanced"):
        problems.append(f"it came from {provenance['sampler_class']}, whose settings are replayed as a KSampler's")
    return problems
