"""Instance Unlearn: ComfyUI node pack for prompt-free instance unlearning.

Only the web folder and a lazy entry point live here, so that importing this package outside
ComfyUI (tests, the headless library) never imports the host.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import extension

    return await extension.comfy_entrypoint()
