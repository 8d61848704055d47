"""The diffusion model as the method sees it: the denoiser interface, noise processes, prediction
types, noise and the core's sampler."""
