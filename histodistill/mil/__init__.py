"""Slide-level MIL on feature bags: models registered by name (CLAM-SB, CLAM-MB, DSMIL,
TransMIL), HDF5 bags, the training and evaluation loop and cross-centre transfer.

Importing this package registers every model in :data:`MODELS`.
"""

from histodistill.mil.base import MODELS, BagOutput, MILModel, build
from histodistill.mil import clam, dsmil, transmil  # noqa: F401  (registration)

__all__ = ["MODELS", "BagOutput", "MILModel", "build"]
