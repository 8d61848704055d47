"""Errors the pack raises on purpose, each telling the user what to change."""

from __future__ import annotations


class UnlearnError(Exception):
    """Base class: anything the user can fix by changing an input."""


class InputError(UnlearnError, ValueError):
    """An input (image, mask, set, config value, name) is unusable; the message says why."""


class TrainingDiverged(UnlearnError, RuntimeError):
    """A loss or gradient became non-finite; nothing was written and the base is untouched."""

    def __init__(self, step: int, what: str):
        self.step = step
        super().__init__(
            f"training diverged at step {step}: the {what} is not finite. Nothing was saved. "
            "Lower the learning rate (or enable gradient clipping) and run again."
        )


class TrainingStopped(UnlearnError):
    """The user cancelled; nothing was written and the base is untouched."""
