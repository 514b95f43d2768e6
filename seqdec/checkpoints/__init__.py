"""Checkpoint loading: `load_pretrained(name_or_path)` and format loaders."""

from seqdec.checkpoints.convert import CheckpointError
from seqdec.checkpoints.registry import KNOWN_MODELS, load_pretrained

__all__ = ["CheckpointError", "KNOWN_MODELS", "load_pretrained"]
