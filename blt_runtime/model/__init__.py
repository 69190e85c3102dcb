"""BLT modules, one file per component; see blt.py for the whole model."""

from .blt import BltModel, BltOutput, checkpoint_key

__all__ = ["BltModel", "BltOutput", "checkpoint_key"]
