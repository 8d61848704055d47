"""ComfyUI nodes of the pack: thin wrappers that read inputs, call unlearn_core, return outputs.

Only imported inside ComfyUI (through the root ``comfy_entrypoint``). ``host.py`` is the one
module that touches ComfyUI's model objects and ``paths.py`` the one that reads its folders;
``config_inputs.py`` builds the training inputs from the core's config table and ``images.py``
holds the IMAGE helpers the nodes share, so that no node imports another.
"""
