"""Distillation methods, registered by name; the name in a result target picks one.

Importing this package registers every method in :data:`METHODS`.
"""

from histodistill.distill.base import METHODS, Context, Distiller, build
from histodistill.distill import coreset, dc, dm, glad, histodd, mtt, ptm, slfd  # noqa: F401  (registration)

__all__ = ["METHODS", "Context", "Distiller", "build"]
