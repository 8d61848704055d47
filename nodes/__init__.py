"""ComfyUI nodes of the pack: thin wrappers that read inputs, call unlearn_core, return outputs.

Only imported inside ComfyUI (through the root ``comfy_entrypoint``). ``host/`` is the one
package that touches ComfyUI's model objects and ``paths.py`` the one module that reads its folders;
``config_inputs.py`` builds the training inputs from the core's config table and ``images.py``
holds the IMAGE helpers the nodes share, so that no node imports another.
"""
