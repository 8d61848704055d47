"""ComfyUI's side of the pack: the one package of the nodes that touches ComfyUI's model,
conditioning, latent, VAE and server objects. A node hands them here and gets the core's types
back; of the nodes' own modules it reads only ``images.py`` (and ``targets.py``'s types).

- ``family.py``: which models train, their noising as the core's process, their LoRA targets;
- ``latents.py``: raw LATENT samples and the space the network denoises;
- ``conditioning.py``: CONDITIONING as the core's per-sample tensors, and as a forget set stores it;
- ``sampling.py``: ComfyUI's KSampler as the core's Sampler, replay prompts, each target's noise;
- ``adapters.py``: LoRA training on a clone that leaves the cached model untouched, and the clone
  as the core's denoiser;
- ``vae.py``: encoding, decoding and the CLIP vision embedder;
- ``events.py``: the progress bar, cancel, websocket events and the server's routes;
- ``model.py``: :class:`~.model.HostModel`, a loaded model with all of the above, as the nodes use it;
- ``unlearning.py``: Instance Unlearn LoRA's run, ComfyUI's half first and the core's after it.
"""

