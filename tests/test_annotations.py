"""ASAP XML parsing and the tumour fraction of patches, on hand-made polygons."""

from __future__ import annotations

import numpy as np
import pytest

from histodistill import config
from histodistill.slides import annotations
from histodistill.io import InputError

# the tiling settings the reader takes (ASAP's and Camelyon16's group names)
GROUPS = {k: config.defaults("$defs/tiling")[k] for k in ("tumour_groups", "exclusion_groups",
                                                           "ignore_groups")}

SQUARE = np.array([[256, 256], [512, 256], [512, 512], [256, 512]], float)
HOLE = np.array([[384, 384], [512, 384], [512, 512], [384, 512]], float)


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "a.xml"
    annotations.write_asap_xml(path, {"_0": [SQUARE], "_2": [HOLE]})
    ann = annotations.read_asap_xml(path, **GROUPS)
    assert len(ann.tumour) == 1 and len(ann.exclusion) == 1
    np.testing.assert_allclose(ann.tumour[0], SQUARE)
    np.testing.assert_allclose(ann.exclusion[0], HOLE)


def test_tumour_fraction_of_hand_made_polygon():
    ann = annotations.Annotation(tumour=[SQUARE])
    coords = np.array([[256, 256], [384, 384], [128, 256], [192, 256], [512, 512], [0, 0]])
    frac = annotations.tumour_fraction(ann, coords, 128)
    # inside, inside, outside, left half inside, outside (edge), far away
    np.testing.assert_allclose(frac, [1, 1, 0, 0.5, 0, 0])


def test_exclusion_polygon_cuts_a_hole():
    ann = annotations.Annotation(tumour=[SQUARE], exclusion=[HOLE])
    frac = annotations.tumour_fraction(ann, np.array([[256, 256], [384, 384], [384, 256]]), 128)
    np.testing.assert_allclose(frac, [1, 0, 1])


def test_triangle_fraction_is_its_area_share():
    tri = np.array([[0, 0], [1024, 0], [0, 1024]], float)
    frac = annotations.tumour_fraction(annotations.Annotation(tumour=[tri]),
                                       np.array([[0, 0]]), 1024, samples=64)
    assert frac[0] == pytest.approx(0.5, abs=0.02)


def test_camelyon_groups_and_ignored_groups(tmp_path):
    path = tmp_path / "c16.xml"
    annotations.write_asap_xml(path, {"_0": [SQUARE], "_1": [SQUARE + 600], "_2": [HOLE],
                                      "Other": [SQUARE + 1200]})
    ann = annotations.read_asap_xml(path, **{**GROUPS, "ignore_groups": ["Other"]})
    assert (len(ann.tumour), len(ann.exclusion)) == (2, 1)


def test_malformed_xml_names_the_file(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<ASAP_Annotations><Annotations><Annotation")
    with pytest.raises(InputError, match=r"\[tile\] .*broken.xml: annotation XML does not parse"):
        annotations.read_asap_xml(path, **GROUPS)


def test_bad_coordinate_names_the_file(tmp_path):
    path = tmp_path / "badcoord.xml"
    path.write_text('<ASAP_Annotations><Annotations><Annotation Name="t" PartOfGroup="_0">'
                    '<Coordinates><Coordinate Order="0" X="abc" Y="1"/></Coordinates>'
                    "</Annotation></Annotations></ASAP_Annotations>")
    with pytest.raises(InputError, match="badcoord.xml: annotation 't' has a bad coordinate"):
        annotations.read_asap_xml(path, **GROUPS)


def test_wrong_xml_kind_is_rejected(tmp_path):
    path = tmp_path / "other.xml"
    path.write_text("<svg><rect/></svg>")
    with pytest.raises(InputError, match="not an ASAP annotation file"):
        annotations.read_asap_xml(path, **GROUPS)
