"""The pack's ComfyExtension: the node list, and the web routes (registered on load, not import)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import paths, routes
from .build_surrogate import BuildSurrogate
from .host.events import server_routes
from .mark_undesired import MarkUndesiredOutput
from .preserve_check import PreserveCheck
from .targets import store
from .unlearn_lora import InstanceUnlearnLoRA

NODES: list[type[io.ComfyNode]] = [MarkUndesiredOutput, BuildSurrogate, InstanceUnlearnLoRA, PreserveCheck]


_set_up = False


def set_up_once() -> None:
    """The web routes and the workflows' example inputs, once per process (they must exist before
    the server adds its routes to the app)."""
    global _set_up
    if _set_up:
        return
    _set_up = True
    paths.install_example_inputs()  # the inpaint workflow's example image, so it loads as shipped
    table = server_routes()
    if table is not None:
        routes.register(table, routes.ForgetSetHandlers(store, paths.directory_by_type))


class InstanceUnlearnExtension(ComfyExtension):
    async def on_load(self) -> None:
        set_up_once()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        set_up_once()  # ComfyUI 0.3.x never calls on_load; both come before the server's routes
        return NODES


async def comfy_entrypoint() -> InstanceUnlearnExtension:
    return InstanceUnlearnExtension()
