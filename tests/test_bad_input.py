"""Bad input never passes silently (issue 7): each case gets one error naming the stage and the
file or config key, and leaves no partial output."""

from __future__ import annotations

import copy
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import DATASET
from histodistill import config
from histodistill.data import ingest
from histodistill.slides import annotations, cohort, tiling, wsi
from histodistill.io import InputError
from histodistill.data.store import PatchStore, StoreWriter

CONFIG = config.read(config.CONFIG, *config.overlays("demo", "demo_patches", "pcam"))
TILING = config.validate({"datasets": {}})["tiling"] | {"magnification": 10, "patch_size": 32,
                                                        "stride": 32, "mask_mpp": 4.0}


@pytest.mark.parametrize("section, override, message", [
    ("distill", {"methods": {"histodd": {"outer_loops": 3}}},
     r"'datasets.demo.distill.methods.histodd.outer_loops' is not recognised; allowed keys here: \['alpha'"),
    ("distill", {"methods": {"histo_dd": {}}},
     r"'datasets.demo.distill.methods' = 'histo_dd' is not allowed; choose one of \['histodd'"),
    ("evaluate", {"augment": {"ops": ["shear"]}},
     r"'datasets.demo.evaluate.augment.ops.0' = 'shear' is not allowed"),
    ("evaluate", {"archz": ["convnet"]},
     r"'datasets.demo.evaluate.archz' is not recognised; allowed keys here: \['arch_kwargs'"),
    ("evaluate", {"full": {"epoch": 1}},
     r"'datasets.demo.evaluate.full.epoch' is not recognised; allowed keys here: \['batch'"),
    ("tiling", {"patchsize": 64},
     r"'datasets.demo.tiling.patchsize' is not recognised; allowed keys here: \['default_mpp'"),
    ("tiling", {"patch_size": 0}, r"'datasets.demo.tiling.patch_size' = 0: 0 is less than the minimum of 8"),
    ("tiling", {"stride": -4}, r"'datasets.demo.tiling.stride' = -4: -4 is less than the minimum"),
    ("distill", {"methods": {"dm": {"iterations": {10: 0}}}},
     r"'datasets.demo.distill.methods.dm.iterations' = \{10: 0\}: expected one count \(at least 1\)"),
    ("distill", {"methods": {"dm": {"lr_img": -1.0}}},
     r"'datasets.demo.distill.methods.dm.lr_img' = -1.0: expected one rate \(above 0\)"),
    ("distill", {"seed": -1}, r"'datasets.demo.distill.seed' = -1: -1 is less than the minimum of 0"),
])
def test_dataset_override_typos_fail_at_load(section, override, message):
    cfg = copy.deepcopy(CONFIG)
    cfg["datasets"]["demo"][section] = override
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("target, message", [
    ("dm_ipc0", r"target dm_ipc0 of dataset 'demo_patches': ipc is the number of images per "
                r"class, at least 1"),
    ("random_ipc0", r"target random_ipc0 of dataset 'demo_patches': ipc is the number"),
    ("dm_ipc25", r"\[distill\] .*patches.zarr: ipc 25 exceeds the 24 training patches of class "
                 r"'dark'.*choose ipc <= 24"),
])
def test_an_impossible_ipc_target_fails_the_dry_run_with_its_line(tmp_path, target, message):
    """The workflow, not only the library: the error names the target or the class, and the
    dry run writes nothing."""
    import re

    from conftest import make_toy_store, snakemake, tiny_config

    tiny_config(tmp_path / "config.yaml")
    store = make_toy_store(tmp_path / "results" / "demo_patches" / "patches.zarr")
    def written() -> list[Path]:  # outside Snakemake's own bookkeeping
        return sorted(p for p in tmp_path.rglob("*") if ".snakemake" not in p.parts)

    before = written()
    proc = snakemake(tmp_path, "-n", "--cores", "1", "--", f"results/demo_patches/{target}.json",
                     check=False)
    assert proc.returncode != 0 and re.search(message, proc.stdout + proc.stderr)
    assert written() == before and store.exists()


@pytest.mark.parametrize("size", [0, -4])
def test_a_pre_tiled_patch_size_below_the_minimum_fails_at_load(size):
    cfg = copy.deepcopy(CONFIG)
    cfg["datasets"]["pcam"]["patch_size"] = size
    with pytest.raises(config.ConfigError, match=rf"'datasets.pcam.patch_size' = {size}: {size} is "
                                                 "less than the minimum of 8"):
        config.validate(cfg)


def test_ipc_zero_and_ipc_above_a_class_count_are_one_error(tmp_path):
    from conftest import make_toy_store
    from histodistill.distill.run import distill

    with pytest.raises(config.ConfigError, match=r"target dm_ipc0 of dataset 'demo': ipc is the "
                                                 r"number of images per class, at least 1"):
        config.method_config(config.validate(copy.deepcopy(CONFIG)), "demo", "dm", 0)
    store = make_toy_store(tmp_path / "p.zarr")  # 24 training patches per class
    with pytest.raises(InputError, match=r"^\[distill\] .*p.zarr: ipc 25 exceeds the 24 training "
                                         r"patches of class 'dark'.*choose ipc <= 24"):
        distill("random", 25, {}, 0,
                {"zarr": tmp_path / "r.zarr", "grid": tmp_path / "r.png", "cost": tmp_path / "r.json"},
                store_path=store, cache_mb=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr"]  # nothing written


def test_dataset_overrides_get_no_schema_defaults():
    cfg = copy.deepcopy(CONFIG)
    cfg.setdefault("distill", {})["pool"] = {"net": "resnet18"}
    cfg["datasets"]["demo"]["distill"] = {"pool": {"size": 2}}
    cfg = config.validate(cfg)
    assert cfg["datasets"]["demo"]["distill"] == {"pool": {"size": 2}}
    pool = config.section(cfg, "demo", "distill")["pool"]
    assert (pool["net"], pool["size"]) == ("resnet18", 2)  # the global choice survives


def leftovers(tmp_path: Path, name: str = "p.zarr") -> list[str]:
    """Outputs and partial outputs of a failed run next to ``name``."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.lstrip(".").startswith(name))


def pixels(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


GOOD_NPZ = {"train_images": pixels(6), "train_labels": np.array([[0], [1], [0], [1], [0], [1]]),
            "test_images": pixels(2, seed=1), "test_labels": np.array([[0], [1]])}


@pytest.mark.parametrize("edit, message", [
    ({"train_labels": np.eye(2, dtype=np.int64)[[0, 1, 0, 1, 0, 1]]},
     r"train_labels has shape \(6, 2\); expected one class index per image \(one-hot"),
    ({"train_images": pixels(6).astype(np.float32) / 255},
     r"train_images has dtype float32, values 0 to 1; expected integer pixels in 0-255"),
    ({"train_images": pixels(6).astype(np.int16) * 2},
     r"train_images has values 0 to 5\d\d; expected 0-255"),
    ({"train_labels": np.array([0, 1, -1, 1, 0, 1])},
     r"train_labels holds label -1; class indices start at 0"),
    ({"train_labels": np.array([0, 1, 0, 1, 0, 2])},
     r"labels go up to 2 but 2 classes are named \(datasets.<name>.classes: \['a', 'b'\]\)"),
    ({"train_labels": None}, r"array 'train_labels' is missing \(arrays: \['test_images'"),
    ({"train_labels": np.array([0, 1, 0, 1, 0])}, r"train_labels has 5 labels for 6 images"),
    ({"test_images": pixels(2, seed=1)[:, :, :, :2]},
     r"test_images has shape \(2, 8, 8, 2\); expected \(N, H, W\) or \(N, H, W, 3\)"),
    ({"train_labels": np.array([0, 0, 0, 0, 0, 0])}, r"class\(es\) \['b'\] have no training images"),
    ({"train_images": pixels(6)[:, :, :6]}, r"train_images are 6x8 px; patches must be square"),
    ({"train_images": pixels(6, size=4), "test_images": pixels(2, size=4)},
     r"train_images are 4x4 px; patches must be square and at least 8 px"),
    ({"test_images": pixels(2, size=16)},
     r"test_images are 16 px but train_images 8 px; set datasets.<name>.patch_size"),
    ({"train_labels": np.array([0, 1, 0, 1, 0, 2**63 + 1], dtype=np.uint64)},
     r"train_labels holds label 9223372036854775809, not a class index"),
])
def test_bad_npz_names_the_file_and_leaves_nothing(tmp_path, edit, message):
    arrays = {k: v for k, v in {**GOOD_NPZ, **edit}.items() if v is not None}
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=r"\[ingest\] .*d.npz: " + message):
        ingest.ingest_npz(tmp_path / "d.npz", tmp_path / "p.zarr", None, {}, ["a", "b"])
    assert leftovers(tmp_path) == []


def test_npz_class_names_given_twice_are_an_error(tmp_path):
    np.savez(tmp_path / "d.npz", **GOOD_NPZ, class_names=np.array(["x", "x"]))
    with pytest.raises(InputError, match=r"class name\(s\) \['x'\] appear more than once"):
        ingest.ingest_npz(tmp_path / "d.npz", tmp_path / "p.zarr", None, {})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("edit, message", [
    ({"classes": ["a", "a"]}, r"'datasets.pcam.classes' = \['a', 'a'\]: .*non-unique"),
    ({"test_fraction": float("nan")}, r"'datasets.pcam.test_fraction' = nan: not a number"),
])
def test_repeated_classes_and_nan_settings_are_refused_at_load(edit, message):
    cfg = copy.deepcopy(CONFIG)
    cfg["datasets"]["pcam"].update(edit)
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_npz_without_class_names_counts_labels_and_a_good_npz_passes(tmp_path):
    np.savez(tmp_path / "d.npz", **GOOD_NPZ)
    store = PatchStore(ingest.ingest_npz(tmp_path / "d.npz", tmp_path / "p.zarr", None, {}))
    assert store.class_names == ["0", "1"] and len(store) == 8
    assert leftovers(tmp_path) == ["p.zarr"]


@pytest.mark.parametrize("damage", ["truncate", "scramble"])
def test_corrupt_npz_names_the_file(tmp_path, damage):
    np.savez_compressed(tmp_path / "d.npz", **GOOD_NPZ)
    raw = (tmp_path / "d.npz").read_bytes()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # the zip directory survives, a member's compressed bytes do not
        start = raw.index(b"train_images.npy") + 40
        raw = raw[:start] + bytes(200) + raw[start + 200:]
    (tmp_path / "d.npz").write_bytes(raw)
    with pytest.raises(InputError, match=r"\[ingest\] .*d.npz: (npz|array '\w+') cannot be read"):
        ingest.ingest_npz(tmp_path / "d.npz", tmp_path / "p.zarr", None, {})
    assert leftovers(tmp_path) == []


def test_store_writer_rejects_rows_of_unequal_length(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", 8)
    n = 3
    with pytest.raises(ValueError, match=r"label has shape \(4,\), expected \(3,\)"):
        writer.append(pixels(n), np.zeros((n, 2)), np.zeros(n), np.zeros(n + 1), np.zeros(n))
    with pytest.raises(ValueError, match=r"patches has shape \(3, 3, 4, 4\), expected \(3, 3, 8, 8\)"):
        writer.append(pixels(n, 4), np.zeros((n, 2)), np.zeros(n), np.zeros(n), np.zeros(n))
    assert writer.n == 0  # nothing half written


def image_tree(root: Path, layout: dict[str, list[str]]) -> None:
    """``{"Train/adi": [...], ...}``: folders of 8 x 8 PNGs, one per listed name."""
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True)
        for name in names:  # distinct pixels per file: a copy in two splits is an error
            seed = zlib.crc32(f"{folder}/{name}".encode())
            Image.fromarray(pixels(1, seed=seed)[0]).save(root / folder / f"{name}.png")


def test_imagefolder_split_folders_are_recognised_in_any_spelling(tmp_path):
    image_tree(tmp_path / "d", {"Train/adi": ["a", "b"], "Train/tum": ["c"], "valid/adi": ["d"],
                                "valid/tum": ["e"], "TEST/adi": ["f"], "TEST/tum": ["g"]})
    store = PatchStore(ingest.ingest_dataset("f", {**DATASET, "format": "imagefolder", "root": str(tmp_path / "d")},
                                             tmp_path / "p.zarr"))
    assert store.class_names == ["adi", "tum"]
    assert list(store.array("split")) == [0, 0, 0, 1, 1, 2, 2]
    assert list(store.array("label")) == [0, 0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("layout, message", [
    ({"train/adi": ["a"], "train/tum": ["b"], "tum": ["c"]},
     r"mixes split folders \['train'\] with other folders \['tum'\]"),
    ({"train/adi": ["a"], "val/adi": ["b"], "Validation/adi": ["c"]},
     r"folders 'Validation' and 'val' are both the val split"),
    ({"train/adi": ["a"], "test/adi": ["b"], "test/tum": ["c"]},
     r"class\(es\) \['tum'\] have no training images"),
])
def test_bad_imagefolder_layout_names_the_root(tmp_path, layout, message):
    image_tree(tmp_path / "d", layout)
    with pytest.raises(InputError, match=r"\[ingest\] .*d: " + message):
        ingest.ingest_dataset("f", {**DATASET, "format": "imagefolder", "root": str(tmp_path / "d")},
                              tmp_path / "p.zarr")
    assert leftovers(tmp_path) == []


def xml_with(tmp_path: Path, x: str, group: str = "_0") -> Path:
    path = tmp_path / "ann.xml"
    coords = "".join(f'<Coordinate Order="{i}" X="{cx}" Y="{cy}"/>'
                     for i, (cx, cy) in enumerate([(x, "10"), ("200", "10"), ("200", "200")]))
    path.write_text(f'<ASAP_Annotations><Annotations><Annotation Name="A1" PartOfGroup="{group}">'
                    f"<Coordinates>{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    return path


@pytest.mark.parametrize("x, group, message", [
    ("nan", "_0", r"annotation 'A1' \(group '_0'\) has a non-finite coordinate \(nan\)"),
    ("inf", "_0", r"annotation 'A1' \(group '_0'\) has a non-finite coordinate \(inf\)"),
    ("10", "Metastasis", r"annotation 'A1' \(group 'Metastasis'\): the group is not in "
                         r"tiling.tumour_groups \['_0'.*add it there or to tiling.ignore_groups"),
])
def test_bad_annotation_coordinates_and_groups(tmp_path, x, group, message):
    with pytest.raises(InputError, match=r"\[tile\] .*ann.xml: " + message):
        annotations.read_asap_xml(xml_with(tmp_path, x, group), tumour_groups=TILING["tumour_groups"],
                                  exclusion_groups=TILING["exclusion_groups"],
                                  ignore_groups=TILING["ignore_groups"])


def test_annotation_outside_the_slide_names_the_slide_size(tumour_slide, tmp_path):
    xml = tmp_path / "far.xml"
    annotations.write_asap_xml(xml, {"_0": [np.array([[50000, 40000], [51000, 40000], [51000, 41000]])]})
    with pytest.raises(InputError, match=r"\[tile\] .*far.xml: annotation 'Annotation 0' \(group '_0'\) "
                                         r"lies wholly outside the slide: x 50000..51000, y 40000..41000 "
                                         r"on a 1024 x 768 level-0 slide"):
        tiling.plan_slide(tumour_slide, str(xml), "tumor", 0, TILING, ["normal", "tumor"], threads=1)
    beyond = np.array([[-500, -500], [1500, -500], [1500, 1200], [-500, 1200]])  # past every edge
    annotations.write_asap_xml(xml, {"_0": [beyond]})
    _, labels, _ = tiling.plan_slide(tumour_slide, str(xml), "normal", 0, TILING, ["normal", "tumor"], threads=1)
    assert len(labels) and (labels == 1).all()


CHECK = {"unannotated_label": "normal", "tumour_class": "tumor"}  # what check_cohort reads


def test_tumour_slide_without_annotation_fails_before_tiling(tumour_slide, tmp_path):
    (tmp_path / "c16" / "training" / "tumor").mkdir(parents=True)
    shutil.copy(tumour_slide, tmp_path / "c16" / "training" / "tumor" / "tumor_001.tif")
    dataset = {**DATASET, "format": "wsi", "layout": "camelyon16", "root": str(tmp_path / "c16")}
    rows = cohort.build_table("c16", dataset)
    assert [(r["slide"], r["annotation"]) for r in rows] == [("tumor_001", "")]
    with pytest.raises(InputError, match=r"tumor_001.tif: dataset 'c16': slide labelled 'tumor' "
                                         r"has no annotation"):
        tiling.check_cohort("c16", rows, CHECK, class_names=["normal", "tumor"])
    tiling.check_cohort("c16", rows, CHECK, class_names=["normal", "tumor"], unannotated=["tumor_001"])  # opt-in


def test_missing_annotation_in_a_slide_table_fails_before_tiling(tumour_slide, tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text(f"slide,label,path,annotation\ns1,tumor,{tumour_slide},{tmp_path / 'gone.xml'}\n")
    with pytest.raises(InputError, match=r"\[cohort\] .*gone.xml: annotation of slide s1 does not exist"):
        cohort.build_table("t", {**DATASET, "format": "wsi", "layout": "table", "root": str(tmp_path),
                                              "table": str(table), "extra_roots": [str(tumour_slide.parent)]})


@pytest.mark.parametrize("row, message", [
    ("s1,tumor,{slide},,training,", r"line 2: split 'training' is not one of \['train', 'val', "
                                    r"'test'\].*\(did you mean 'train'\?\)"),
    ("s1,tumor,{slide},,train,A", r"line 2: centre 'A' is not an integer"),
    ("s1,tumor,{outside},,train,", r"line 2: slide path .* outside the dataset root"),
    ("s1,tumor,../../x.tif,,train,", r"line 2: slide path '../../x.tif' resolves to .* outside"),
    ("s1,tumor,{slide},/etc/x.xml,train,", r"line 2: annotation '/etc/x.xml' resolves to .* outside"),
    ("../../s9,tumor,,,train,", r"line 2: slide '../../s9': file '.*slides/../../s9' resolves to .* outside"),
    ("s1,,{slide},,train,", r"line 2: empty \['label'\] cell"),
    ("s1,tumor,{slide}", r"line 2: has 3 fields, the header 6"),
    ("s1,tumor,{slide},,train,\ns2,tumor,{slide},,test,",
     r"line 3: slide file .*s1.tif is already listed on line 2: one slide file per row"),
])
def test_slide_table_values_are_checked_at_the_cohort_stage(tumour_slide, tmp_path, row, message):
    root = tmp_path / "cohort"
    (root / "slides").mkdir(parents=True)
    shutil.copy(tumour_slide, root / "slides" / "s1.tif")
    table = root / "labels.csv"
    table.write_text("slide,label,path,annotation,split,centre\n"
                     + row.format(slide=root / "slides" / "s1.tif", outside=tumour_slide) + "\n")
    with pytest.raises(InputError, match=r"^\[cohort\] .*labels.csv, " + message):
        cohort.build_table("t", {**DATASET, "format": "wsi", "layout": "table", "root": str(root),
                                              "table": str(table)})


def test_a_slide_label_differing_in_case_from_a_class_is_an_error_naming_it(tumour_slide, tmp_path):
    """'Tumor' against class 'tumor' used to tile every patch as the unannotated label."""
    root = tmp_path / "cohort"
    (root / "slides").mkdir(parents=True)
    shutil.copy(tumour_slide, root / "slides" / "s1.tif")
    (root / "labels.csv").write_text("slide,label,split\ns1,Tumor,train\n")
    rows = cohort.build_table("t", {**DATASET, "format": "wsi", "layout": "table", "root": str(root),
                                                 "table": str(root / "labels.csv")})
    for check in (CHECK, CHECK | {"unannotated_label": "slide"}):
        with pytest.raises(InputError, match=r"s1.tif: dataset 't': label 'Tumor' is not one of "
                                             r"the classes .*\(did you mean 'tumor'\?\)"):
            tiling.check_cohort("t", rows, check, class_names=["normal", "tumor"], unannotated=["s1"])


@pytest.mark.parametrize("direct", [True, False])
def test_corrupt_jpeg_tile_names_the_slide_level_and_region(tumour_slide, tmp_path, direct):
    cfg = TILING | {"magnification": 20, "patch_size": 64, "stride": 64, "max_patches_per_slide": 0}
    coords, _, geom = tiling.plan_slide(tumour_slide, "", "normal", 0, cfg, ["normal", "tumor"], threads=1)
    assert geom.level == 0
    with tifffile.TiffFile(tumour_slide) as tif:
        page = tif.pages[0]
        tile = int(coords[0, 1] // page.tilelength * -(-page.imagewidth // page.tilewidth)
                   + coords[0, 0] // page.tilewidth)
        offset = page.dataoffsets[tile]
    raw = bytearray(tumour_slide.read_bytes())
    raw[offset:offset + 64] = bytes(range(64))  # no longer a JPEG stream; the TIFF still opens
    bad = tmp_path / "bad.tif"
    bad.write_bytes(raw)
    where = r"tile \d+ \(level pixels x \d+, y \d+\)" if direct else r"region x \d+, y \d+ \(level-0\)"
    with pytest.raises(InputError, match=r"^\[tile\] .*bad.tif: pixel data cannot be decoded at "
                                         rf"level 0, {where}.*Not a JPEG file"):
        wsi.read_patches(bad, coords, geom, threads=2, direct=direct)


def test_bad_label_csvs_name_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("image,label\n")
    dataset = {**DATASET, "format": "csv", "root": str(tmp_path), "csv": {"train": "{root}/train.csv"}}
    with pytest.raises(InputError, match=r"\[ingest\] .*: the label CSVs \['\{root\}/train.csv'\] list no images"):
        ingest.ingest_dataset("u", dataset, tmp_path / "p.zarr")
    with pytest.raises(InputError, match=r"\[ingest\] .*train.csv: csv key 'valid' is not a split; use \['train'"):
        ingest.ingest_dataset("u", {**dataset, "csv": {"valid": "{root}/train.csv"}}, tmp_path / "p.zarr")
    np.save(tmp_path / "one.npy", pixels(2))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(InputError, match=r"one.npz: holds a single array, not an npz archive"):
        ingest.ingest_npz(tmp_path / "one.npz", tmp_path / "p.zarr", None, {})
    assert leftovers(tmp_path) == []
