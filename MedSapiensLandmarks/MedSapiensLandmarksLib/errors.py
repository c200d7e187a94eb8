"""Errors shared by the model-file readers (the lowest room of the loading path)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""
