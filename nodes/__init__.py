"""ComfyUI nodes of the pack: thin wrappers that read inputs, call unlearn_core, return outputs.

Only imported inside ComfyUI (through the root ``comfy_entrypoint``); ``host.py`` is the one
module that touches ComfyUI's model objects.
"""
