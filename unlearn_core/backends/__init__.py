"""Model backends: diffusers here; the ComfyUI adapter lives in the pack's nodes/host/ package."""
