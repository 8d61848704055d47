"""Files: LoRA and full-weights results, safetensors, atomic writes and safe names, model folders,
merging a result into a model."""
