"""Distillation methods, registered by name; the name in a result target picks one.

Importing this package registers every method the catalogue lists for the distill stage
(:mod:`histodistill.catalogue`) in :data:`METHODS`.
"""

from histodistill.distill.base import METHODS, Context, Distiller, build
from histodistill.registry import import_catalogued

__registry__ = "distill"
import_catalogued(__registry__)

__all__ = ["METHODS", "Context", "Distiller", "build"]
