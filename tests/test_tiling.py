"""Tiling a cohort into the patch store: labels, caps, atomic output, resume."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import DATASET
from histodistill import config
from histodistill.slides import annotations, cohort, tiling, wsi
from histodistill.io import InputError
from histodistill.data.store import PatchStore

CFG = config.validate({"datasets": {}})["tiling"] | {
    "magnification": 10, "patch_size": 32, "stride": 32, "max_patches_per_slide": 0}
CLASSES = ["normal", "tumor"]


def rows_of(small_cohort):
    return cohort.build_table("small", {**DATASET, "format": "wsi", "layout": "camelyon16",
                                        "root": str(small_cohort), "centre_split": {"normal": 1, "tumor": 1}})


def test_camelyon16_layout_table(small_cohort):
    rows = rows_of(small_cohort)
    assert [(r["slide"], r["label"], r["split"]) for r in rows] == [
        ("normal_001", "normal", "train"), ("tumor_001", "tumor", "train"),
        ("test_001", "normal", "test"), ("test_002", "tumor", "test")]
    assert rows[1]["annotation"].endswith("lesion_annotations/tumor_001.xml")
    assert rows[3]["annotation"].endswith("testing/lesion_annotations/test_002.xml")
    assert rows[0]["annotation"] == "" and rows[2]["centre"] == -1


def test_labels_follow_a_hand_made_polygon(tumour_slide, tmp_path):
    xml = tmp_path / "square.xml"
    square = np.array([[320, 192], [576, 192], [576, 448], [320, 448]], float)  # 64-px grid
    annotations.write_asap_xml(xml, {"Tumor": [square]})
    coords, labels, geom = tiling.plan_slide(tumour_slide, str(xml), "tumor", 0, CFG, CLASSES, threads=1)
    size0 = geom.patch_size * geom.scale
    inside = ((coords[:, 0] >= 320) & (coords[:, 0] + size0 <= 576)
              & (coords[:, 1] >= 192) & (coords[:, 1] + size0 <= 448))
    np.testing.assert_array_equal(labels, inside.astype(int))
    assert inside.sum() > 0


def test_class_names_default_to_slide_labels_plus_tumour():
    rows = [{"label": "normal"}, {"label": "normal"}]
    assert tiling.class_names(rows, CFG) == ["normal", "tumor"]
    assert tiling.class_names(rows, CFG, ["b", "a"]) == ["b", "a"]


def test_unannotated_label_can_be_the_slide_label(tumour_slide):
    _, labels, _ = tiling.plan_slide(tumour_slide, "", "tumor", 0,
                                     CFG | {"unannotated_label": "slide"}, CLASSES, threads=1)
    assert (labels == 1).all()


def test_cap_samples_deterministically(tumour_slide):
    cfg = CFG | {"max_patches_per_slide": 20}
    a, _, _ = tiling.plan_slide(tumour_slide, "", "tumor", 0, cfg, CLASSES, threads=1)
    b, _, _ = tiling.plan_slide(tumour_slide, "", "tumor", 0, cfg, CLASSES, threads=1)
    c, _, _ = tiling.plan_slide(tumour_slide, "", "tumor", 0, cfg | {"seed": 1}, CLASSES, threads=1)
    assert len(a) == 20 and (a == b).all() and not (a == c).all()


def test_tile_cohort_store_layout(small_cohort, tmp_path):
    rows = rows_of(small_cohort)
    out = tiling.tile_cohort(rows, CFG, tmp_path / "p.zarr", CLASSES)
    store = PatchStore(out)
    n = len(store)
    assert store.group["patches"].shape == (n, 3, 32, 32) and store.group["patches"].dtype == np.uint8
    assert store.attrs["class_names"] == CLASSES and store.attrs["magnification"] == 10
    assert store.attrs["slides"] == [r["slide"] for r in rows]
    slide, label, split = store.array("slide"), store.array("label"), store.array("split")
    assert set(np.unique(slide)) == {0, 1, 2, 3}
    assert (label[slide == 0] == 0).all() and (label[slide == 1] == 1).any()
    assert (split[slide >= 2] == 2).all() and (split[slide < 2] == 0).all()
    # every stored patch equals a direct read at its coordinates
    s = wsi.open_slide(rows[1]["path"])
    geom = wsi.geometry(s, rows[1]["path"], 10, 32, 32)
    k = np.flatnonzero(slide == 1)[5]
    np.testing.assert_array_equal(store.patches(np.array([k]))[0].transpose(1, 2, 0),
                                  wsi.read_patch(s, store.array("coords")[k], geom))
    assert not (tmp_path / "p.zarr.partial").exists()


@pytest.mark.parametrize("damage", [None, "chunk"])
def test_failure_leaves_no_output_and_resume_matches(small_cohort, tmp_path, monkeypatch, damage):
    rows = rows_of(small_cohort)
    reference = PatchStore(tiling.tile_cohort(rows, CFG, tmp_path / "ref.zarr", CLASSES))
    real_read, calls = wsi.read_patches, []

    def crash_on_third(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise RuntimeError("node died")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(wsi, "read_patches", crash_on_third)
    out = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError):
        tiling.tile_cohort(rows, CFG, out, CLASSES)
    assert not out.exists() and not (tmp_path / "run.zarr.slides").exists()
    partial = tmp_path / "run.zarr.slides.partial"
    assert sorted(p.name for p in partial.iterdir()) == [  # finished slides kept and sealed,
        "normal_001.zarr", "normal_001.zarr.sealed",      # the crashed one removed
        "tumor_001.zarr", "tumor_001.zarr.sealed"]
    if damage == "chunk":  # a finished slide loses a chunk of its patches: redone, not reused
        next(p for p in sorted((partial / "normal_001.zarr" / "patches").rglob("*"))
             if p.is_file() and p.name != "zarr.json").unlink()
    monkeypatch.setattr(wsi, "read_patches", lambda *a, **k: (calls.append(a[0]), real_read(*a, **k))[1])
    resumed = PatchStore(tiling.tile_cohort(rows, CFG, out, CLASSES))
    # two slides before the crash, the crashed one again, one more (and the damaged one again)
    assert len(calls) == 5 + (damage == "chunk")
    for name in ("coords", "slide", "label", "split"):
        np.testing.assert_array_equal(resumed.array(name), reference.array(name))
    np.testing.assert_array_equal(resumed.patches(), reference.patches())


def test_slide_without_tissue_names_the_file(tmp_path, small_cohort):
    import tifffile

    blank = tmp_path / "blank.tif"
    with tifffile.TiffWriter(blank, bigtiff=True) as tif:
        tif.write(np.full((768, 1024, 3), 240, np.uint8), tile=(256, 256), photometric="rgb",
                  resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    rows = rows_of(small_cohort)[:1] + [{**rows_of(small_cohort)[0], "slide": "blank",
                                         "path": str(blank)}]
    out = tmp_path / "p.zarr"
    with pytest.raises(InputError, match=r"\[tile\] .*blank.tif: no tissue found"):
        tiling.tile_cohort(rows, CFG, out, CLASSES)
    assert not out.exists()
    with pytest.raises(InputError, match=r"blank.tif: no tissue found"):  # nothing finished:
        tiling.tile_slides([{**rows[1], "index": 0}], CFG, tmp_path / "tiles", class_names=CLASSES,
                           threads=1)
    assert sorted(p.name for p in tmp_path.glob("tiles*")) == []  # nothing left to resume
    store = PatchStore(tiling.tile_cohort(rows, CFG | {"skip_empty": True}, out, CLASSES))
    assert store.attrs["skipped_slides"] == ["blank"] and set(store.array("slide")) == {0}


def test_unparseable_annotation_names_the_file(tumour_slide, tmp_path):
    xml = tmp_path / "tumor_001.xml"
    xml.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(InputError, match="tumor_001.xml: annotation XML does not parse"):
        tiling.plan_slide(tumour_slide, str(xml), "tumor", 0, CFG, CLASSES, threads=1)


def test_missing_root_and_missing_slide(tmp_path, small_cohort):
    with pytest.raises(InputError, match=r"datasets.c16.root: is not set"):
        cohort.build_table("c16", {**DATASET, "format": "wsi", "layout": "camelyon16", "root": None})
    with pytest.raises(InputError, match=r"datasets.c16.root: folder .* does not exist"):
        cohort.build_table("c16", {**DATASET, "format": "wsi", "layout": "camelyon16",
                                   "root": str(tmp_path / "nowhere")})
    table = tmp_path / "labels.csv"
    table.write_text("slide,label\nghost,normal\n")
    with pytest.raises(InputError, match=r"ghost.*slide listed for the dataset does not exist"):
        cohort.build_table("t", {**DATASET, "format": "wsi", "layout": "table", "root": str(tmp_path),
                                 "table": str(table)})


def test_table_layout_splits_by_slide_and_val_fraction(small_cohort, tmp_path):
    slides = sorted(small_cohort.rglob("*.tif"))
    table = tmp_path / "labels.csv"
    table.write_text("slide,label,path\n" + "".join(
        f"{p.stem},{'tumor' if p.stem in ('tumor_001', 'test_002') else 'normal'},{p}\n" for p in slides))
    cfg = {**DATASET, "format": "wsi", "layout": "table", "root": str(tmp_path), "table": str(table),
           "extra_roots": [str(small_cohort)],
           "test_fraction": 0.5, "seed": 0}
    rows = cohort.build_table("t", cfg)
    by_label = {lab: [r["split"] for r in rows if r["label"] == lab] for lab in ("normal", "tumor")}
    assert sorted(by_label["normal"]) == ["test", "train"] and sorted(by_label["tumor"]) == ["test", "train"]
    assert rows == cohort.build_table("t", cfg)  # seeded
    val = cohort.build_table("c16", {**DATASET, "format": "wsi", "layout": "camelyon16", "root": str(small_cohort),
                                     "val_fraction": 1.0})
    assert [r["split"] for r in val] == ["val", "val", "test", "test"]


def test_batches_name_jobs_by_first_slide_and_carry_the_table_index():
    rows = [{"slide": s} for s in ("a", "b", "c", "d", "e")]
    jobs = tiling.batches(rows, 2)
    assert list(jobs) == ["a", "c", "e"]
    assert [[r["index"] for r in b] for b in jobs.values()] == [[0, 1], [2, 3], [4]]
    assert list(tiling.batches(rows, 1)) == ["a", "b", "c", "d", "e"]
    with pytest.raises(InputError, match="tiling.slides_per_job: must be >= 1"):
        tiling.batches(rows, 0)


def test_batched_jobs_gather_to_the_one_process_store(small_cohort, tmp_path):
    rows = rows_of(small_cohort)
    cfg = CFG | {"max_patches_per_slide": 30}
    ref = PatchStore(tiling.tile_cohort(rows, cfg, tmp_path / "ref.zarr", CLASSES))
    dirs = [tiling.tile_slides(batch, cfg, tmp_path / "tiles" / name, class_names=CLASSES, threads=1)
            for name, batch in tiling.batches(rows, 3).items()]
    got = PatchStore(tiling.gather(rows, dirs[::-1], cfg, out=tmp_path / "got.zarr", class_names=CLASSES))
    for name in ("coords", "slide", "label", "split"):
        np.testing.assert_array_equal(got.array(name), ref.array(name))
    np.testing.assert_array_equal(got.patches(), ref.patches())
    assert got.attrs == ref.attrs
    with pytest.raises(InputError, match="test_002.tif: no tiled output for this slide"):
        tiling.gather(rows, dirs[:1], cfg, out=tmp_path / "bad.zarr", class_names=CLASSES)
    assert not (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad.zarr.partial").exists()


def test_finished_slides_are_kept_unless_their_file_or_settings_change(small_cohort, tmp_path,
                                                                       monkeypatch):
    rows = [r for b in tiling.batches(rows_of(small_cohort)[:2], 1).values() for r in b]
    real_read, calls = wsi.read_patches, []

    def reading(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2 and crash:
            raise KeyboardInterrupt  # the job dies on its second slide
        return real_read(*args, **kwargs)

    monkeypatch.setattr(wsi, "read_patches", reading)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        tiling.tile_slides(rows, CFG, tmp_path / "job", class_names=CLASSES, threads=1)
    crash = False
    tiling.tile_slides(rows, CFG, tmp_path / "job", class_names=CLASSES, threads=1)
    assert calls == [rows[0]["path"], rows[1]["path"], rows[1]["path"]]  # the first not redone
    calls.clear()
    crash = True
    with pytest.raises(KeyboardInterrupt):
        tiling.tile_slides(rows, CFG | {"tissue_threshold": 0.6}, tmp_path / "job2", class_names=CLASSES, threads=1)
    crash = False
    tiling.tile_slides(rows, CFG | {"tissue_threshold": 0.5}, tmp_path / "job2", class_names=CLASSES, threads=1)
    assert len(calls) == 4  # other settings than the finished slide's: both redone


def test_cohort_check_names_dataset_and_file(small_cohort, tmp_path):
    rows = rows_of(small_cohort)
    tiling.check_cohort("c16", rows, CFG, class_names=CLASSES)
    no_xml = [{**r, "annotation": ""} if r["slide"] == "tumor_001" else r for r in rows]
    with pytest.raises(InputError, match=r"tumor_001.tif: dataset 'c16': slide labelled 'tumor' "
                                         "has no annotation"):
        tiling.check_cohort("c16", no_xml, CFG, class_names=CLASSES)
    tiling.check_cohort("c16", no_xml, CFG | {"unannotated_label": "slide"}, class_names=CLASSES)
    with pytest.raises(InputError, match=r"ghost.xml: annotation of slide tumor_001 \(dataset 'c16'\)"):
        tiling.check_cohort("c16", [{**r, "annotation": str(tmp_path / "ghost.xml")}
                                    if r["slide"] == "tumor_001" else r for r in rows], CFG, class_names=CLASSES)
    with pytest.raises(InputError, match="lists slide 'normal_001' twice"):
        tiling.check_cohort("c16", rows + rows[:1], CFG, class_names=CLASSES)
    with pytest.raises(InputError, match=r"datasets.c16.tiling: dataset 'c16': label 'normal' is not"):
        tiling.check_cohort("c16", rows, CFG, class_names=["benign", "tumor"])
    with pytest.raises(InputError, match=r"label 'tumor' is not one of the classes \['a', 'b'\]"):
        tiling.check_cohort("c16", no_xml, CFG | {"unannotated_label": "slide"}, class_names=["a", "b"])
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match="broken.tif: cannot be read by OpenSlide"):
        tiling.check_cohort("c16", rows[:1] + [{**rows[0], "slide": "b", "path": str(broken)}],
                            CFG, class_names=CLASSES)


def test_chunked_reads_into_one_buffer_equal_one_read(cmu_slide):
    cfg = CFG | {"magnification": 20, "patch_size": 256, "stride": 256}
    coords, _, geom = tiling.plan_slide(cmu_slide, "", "normal", 0, cfg, CLASSES, threads=1)
    whole = wsi.read_patches(cmu_slide, coords, geom, threads=2)
    buffer = np.empty((7, 256, 256, 3), np.uint8)  # 240 px tiles: chunk edges share tiles
    chunks = [(start, p.copy()) for start, p in tiling.read_chunks(cmu_slide, coords, geom, 2, buffer)]
    assert [s for s, _ in chunks] == list(range(0, len(coords), 7))
    np.testing.assert_array_equal(np.concatenate([p for _, p in chunks]), whole)
    with pytest.raises(ValueError, match="cannot hold uint8 patches"):
        wsi.read_patches(cmu_slide, coords, geom, threads=2, out=buffer)
    assert tiling.patch_buffer(256, 10**6).nbytes <= tiling.READ_BYTES
    assert len(tiling.patch_buffer(256, 5)) == 5 and len(tiling.patch_buffer(32, 10**6)) % 64 == 0
