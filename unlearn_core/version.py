"""The pack's version, recorded in every LoRA it writes."""

__version__ = "0.1.0"
