"""Selection of images from a pool (a synthetic store, or the real patches): InfoDist's Infomap
communities, HistoDiffusion's confident-and-central samples and seeded random selection,
registered by name (:data:`SELECTORS`), the rule that writes a selected set in the distilled-set
format, and HistoDiffusion's augmentation study. Rule file ``workflow/rules/select.smk``.

Importing this package registers every selector.
"""

from histodistill.select.base import SELECTORS, Candidates, Context, Selector, build
from histodistill.select import centroid, infodist  # noqa: F401  (registration)

__all__ = ["SELECTORS", "Candidates", "Context", "Selector", "build"]
