"""The pack's ComfyExtension: the node list, and the web routes (registered on load, not import)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host, paths, routes
from .build_surrogate import BuildSurrogate
from .mark_undesired import MarkUndesiredOutput
from .preserve_check import PreserveCheck
from .targets import store
from .unlearn_lora import InstanceUnlearnLoRA

NODES: list[type[io.ComfyNode]] = [MarkUndesiredOutput, BuildSurrogate, InstanceUnlearnLoRA, PreserveCheck]


class InstanceUnlearnExtension(ComfyExtension):
    async def on_load(self) -> None:
        table = host.server_routes()
        if table is not None:
            routes.register(table, routes.ForgetSetHandlers(store, paths.directory_by_type))

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> InstanceUnlearnExtension:
    return InstanceUnlearnExtension()
