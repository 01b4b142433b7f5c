"""Camelyon16 / ASAP XML polygon annotations and the tumour fraction of patches.

Camelyon16 lesion files group polygons as ``_0``/``_1`` (tumour) and ``_2`` (normal tissue
excluded from a surrounding tumour polygon); files written by ASAP by hand often use ``Tumor``
and ``Exclusion``. Both are recognised by default and configurable. A polygon in any other
group, with a non-finite coordinate, or lying wholly outside the slide is an error rather than
silently lost tumour: groups meant to be dropped are listed in ``ignore_groups``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.path import Path as MplPath

from histodistill.io import InputError

@dataclass
class Annotation:
    """Tumour and exclusion polygons, each an (K, 2) float array of level-0 ``(x, y)``."""

    tumour: list[np.ndarray] = field(default_factory=list)
    exclusion: list[np.ndarray] = field(default_factory=list)


def read_asap_xml(
    path: str | os.PathLike,
    *,
    tumour_groups: tuple[str, ...] | list[str],
    exclusion_groups: tuple[str, ...] | list[str],
    stage: str = "tile",
    ignore_groups: tuple[str, ...] | list[str],
    bounds: tuple[int, int] | None = None,
) -> Annotation:
    """Parse an ASAP XML file; raise :class:`InputError` naming the file if it is malformed.
    The groups are the tiling settings of the same names (ASAP's and Camelyon16's by default).

    ``bounds`` is the slide's level-0 (width, height): a polygon wholly outside it is an error
    (coordinates of another slide or level). Polygons of groups in ``ignore_groups`` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(stage, path, "annotation file does not exist")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise InputError(stage, path, f"annotation XML does not parse ({err})") from err
    ann = Annotation()
    for node in root.iter("Annotation"):
        group = node.get("PartOfGroup", "")
        try:
            coords = sorted(
                (int(c.get("Order", i)), float(c.get("X", "").replace(",", ".")),
                 float(c.get("Y", "").replace(",", ".")))
                for i, c in enumerate(node.iter("Coordinate"))
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise InputError(stage, path, f"annotation {node.get('Name')!r} has a bad coordinate") from err
        if len(coords) < 3 or group in ignore_groups:
            continue  # points and lines carry no area
        poly = np.array([(x, y) for _, x, y in coords], dtype=np.float64)
        what = f"annotation {node.get('Name')!r} (group {group!r})"
        if not np.isfinite(poly).all():
            raise InputError(stage, path, f"{what} has a non-finite coordinate "
                             f"({poly[~np.isfinite(poly)][0]})")
        if bounds is not None and _outside(poly, bounds):
            lo, hi = poly.min(0), poly.max(0)
            raise InputError(stage, path, f"{what} lies wholly outside the slide: x {lo[0]:.0f}.."
                             f"{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f} on a {bounds[0]} x "
                             f"{bounds[1]} level-0 slide")
        if group in tumour_groups:
            ann.tumour.append(poly)
        elif group in exclusion_groups:
            ann.exclusion.append(poly)
        else:
            raise InputError(stage, path, f"{what}: the group is not in tiling.tumour_groups "
                             f"{list(tumour_groups)} or tiling.exclusion_groups "
                             f"{list(exclusion_groups)}; add it there or to tiling.ignore_groups")
    if root.tag != "ASAP_Annotations" and not (ann.tumour or ann.exclusion):
        raise InputError(stage, path, f"not an ASAP annotation file (root element <{root.tag}>)")
    return ann


def _outside(poly: np.ndarray, bounds: tuple[int, int]) -> bool:
    """Whether the polygon's bounding box misses the slide's level-0 rectangle."""
    lo, hi = poly.min(0), poly.max(0)
    return bool(hi[0] < 0 or hi[1] < 0 or lo[0] > bounds[0] or lo[1] > bounds[1])


def write_asap_xml(path: str | os.PathLike, groups: dict[str, list[np.ndarray]]) -> None:
    """Write polygons, keyed by ASAP group name, as an ASAP XML file (used by the demo cohort)."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    k = 0
    for group, polygons in groups.items():
        for poly in polygons:
            node = ET.SubElement(anns, "Annotation", Name=f"Annotation {k}", Type="Polygon",
                                 PartOfGroup=group, Color="#F4FA58")
            coords = ET.SubElement(node, "Coordinates")
            for i, (x, y) in enumerate(poly):
                ET.SubElement(coords, "Coordinate", Order=str(i), X=f"{x:.2f}", Y=f"{y:.2f}")
            k += 1
    ann_groups = ET.SubElement(root, "AnnotationGroups")
    for group in groups:
        ET.SubElement(ET.SubElement(ann_groups, "Group", Name=group, PartOfGroup="None",
                                    Color="#00ff00"), "Attributes")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def tumour_fraction(ann: Annotation, coords: np.ndarray, size0: float, samples: int = 8) -> np.ndarray:
    """Fraction of each patch inside tumour polygons and outside exclusion polygons.

    Each patch (level-0 corner ``coords``, side ``size0``) is sampled on a ``samples`` x
    ``samples`` grid of cell centres; the fraction is the share of samples that are tumour.
    """
    if len(coords) == 0 or not ann.tumour:
        return np.zeros(len(coords))
    offs = (np.arange(samples) + 0.5) * size0 / samples
    oy, ox = np.meshgrid(offs, offs, indexing="ij")
    pts = (coords[:, None, :] + np.stack([ox.ravel(), oy.ravel()], 1)[None]).reshape(-1, 2)
    inside = _inside_any(ann.tumour, pts) & ~_inside_any(ann.exclusion, pts)
    return inside.reshape(len(coords), -1).mean(1)


def _inside_any(polys: list[np.ndarray], pts: np.ndarray) -> np.ndarray:
    hit = np.zeros(len(pts), bool)
    for poly in polys:
        lo, hi = poly.min(0), poly.max(0)
        near = np.all((pts >= lo) & (pts <= hi), axis=1) & ~hit
        if near.any():
            hit[near] = MplPath(poly).contains_points(pts[near])
    return hit
