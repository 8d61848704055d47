"""The pack's ComfyExtension: the node list (and, on load, the web routes)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .build_surrogate import BuildSurrogate
from .mark_undesired import MarkUndesiredOutput
from .preserve_check import PreserveCheck
from .unlearn_lora import InstanceUnlearnLoRA

NODES: list[type[io.ComfyNode]] = [MarkUndesiredOutput, BuildSurrogate, InstanceUnlearnLoRA, PreserveCheck]


class InstanceUnlearnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> InstanceUnlearnExtension:
    return InstanceUnlearnExtension()
