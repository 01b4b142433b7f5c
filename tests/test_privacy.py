"""Privacy audit (nearest real neighbours, membership inference) and the shareable package
(guard, datasheet, manifest), on real H&E tiles cut from the shipped target image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import AUGMENT, ENCODER, TRAIN
from histodistill import config
from histodistill.data.store import SPLITS, StoreWriter
from histodistill.encoders import train_encoder
from histodistill.io import InputError
from histodistill.privacy.audit import AuditConfig, audit, bootstrap_auc, privacy_audit
from histodistill.privacy.package import verify_package, write_package

SIZE = 16
N_TRAIN, N_TEST = 600, 600
CFG = AuditConfig.from_config({**config.defaults("privacy"), "encoder": "supervised", "samples": 600,
                               "bootstrap": 200, "batch": 97, "grid_pairs": 4})
PACKAGE = {"allow_real_patches": False, "allow_memorised": False, "licence": "CC-BY-4.0",
           "intended_use": "Testing.", "cohort": "Tiles of one real H&E image."}


@pytest.fixture(scope="module")
def tiles(target_image: np.ndarray) -> np.ndarray:
    """Every 16 px tile of the real 1000x1000 H&E image, (N, 3, 16, 16) uint8, shuffled."""
    n = target_image.shape[0] // SIZE
    t = target_image[:n * SIZE, :n * SIZE].reshape(n, SIZE, n, SIZE, 3).transpose(0, 2, 4, 1, 3)
    return np.random.default_rng(0).permutation(t.reshape(-1, 3, SIZE, SIZE))


@pytest.fixture(scope="module")
def tile_store(tiles: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train and test splits of disjoint real tiles; the class is the tile's darkness (above or
    below its split's median: balanced classes), the rest of the tiles are left out of the store."""
    from histodistill.data.stream import record_channel_stats

    path = tmp_path_factory.mktemp("priv") / "p.zarr"
    x = tiles[:N_TRAIN + N_TEST]
    mean = x.reshape(len(x), -1).mean(1)
    y = np.r_[mean[:N_TRAIN] < np.median(mean[:N_TRAIN]),
              mean[N_TRAIN:] < np.median(mean[N_TRAIN:])].astype(np.int64)
    split = np.r_[np.zeros(N_TRAIN), np.full(N_TEST, SPLITS.index("test"))].astype(np.int8)
    writer = StoreWriter(path, SIZE, chunk=64, attrs={"class_names": ["pale", "dark"],
                                                       "split_names": list(SPLITS), "slides": [],
                                                       "patch_size": SIZE, "source": "test"})
    writer.append(x, np.full((len(x), 2), -1), np.full(len(x), -1), y, split)
    record_channel_stats(path)
    return path


@pytest.fixture(scope="module")
def encoder(tile_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "supervised.pt"
    train_encoder(tile_store, out, {**ENCODER, "kind": "supervised", "net": "convnet", "seed": 0,
                               "net_kwargs": {"width": 8, "depth": 2, "norm": "batchnorm"},
                               "train": {**TRAIN, "epochs": 1, "lr": 0.05, "batch": 64},
                               "augment": {**AUGMENT, "preset": "none"}}, cache_mb=8)
    return out


def distilled(path: Path, images: np.ndarray, method: str = "dm",
              sources: np.ndarray | None = None) -> Path:
    """A distilled-set zarr as rule distill writes it."""
    labels = np.arange(len(images)) % 2
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", data=images)
    group.create_array("labels", data=labels.astype(np.int64))
    if sources is not None:
        group.create_array("sources", data=sources.astype(np.int64))
    group.attrs.update({"method": method, "ipc": len(images) // 2, "seed": 0, "config": {},
                        "class_names": ["pale", "dark"], "patch_size": SIZE})
    return path


def noise(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def test_attack_auc_is_one_half_for_an_unrelated_real_set(tile_store, tiles, tmp_path):
    # "synthetic" = real tiles in neither split: nothing about the members can leak
    other = distilled(tmp_path / "other.zarr", tiles[N_TRAIN + N_TEST:][:200])
    section, _ = audit(other, tile_store, None, CFG)
    attack = section["spaces"]["pixel"]["attack"]["random"]
    # balanced samples, same classes; the control set is taken out of the test split first
    assert attack["members"] == attack["nonmembers"] == section["n_heldout"]
    assert section["n_heldout"] + section["n_null"] == N_TEST and section["null_splits"] == ["test"]
    assert 0.44 < attack["auc"] < 0.56 and attack["ci"][0] < 0.5 < attack["ci"][1]
    null = section["spaces"]["pixel"]["attack"]["null"]  # the control reads the same
    assert 0.44 < null["auc"] < 0.56 and null["ci"][0] < 0.5 < null["ci"][1]
    assert section["attack_members"] == "random" and not section["sources_recorded"]
    assert section["heldout_split"] == "test"
    # unrelated real tiles are as far from the training split as held-out ones
    assert 0.8 < section["spaces"]["pixel"]["median_ratio"] < 1.25


def test_attack_auc_is_one_when_the_set_is_the_training_split(tile_store, tiles, tmp_path):
    same = distilled(tmp_path / "same.zarr", tiles[:N_TRAIN])
    section, _ = audit(same, tile_store, None, CFG)
    attack = section["spaces"]["pixel"]["attack"]["random"]
    assert attack["auc"] == 1.0 and attack["ci"] == [1.0, 1.0]
    assert section["memorised"] == 1.0 and section["spaces"]["pixel"]["synthetic_median"] == 0.0
    null = section["spaces"]["pixel"]["attack"]["null"]  # unseen real patches: no such signal
    assert null["ci"][0] < 0.5 < null["ci"][1]


@pytest.mark.slow
def test_coreset_is_memorised_with_sources_found_and_noise_is_not(tile_store, tiles, encoder, tmp_path):
    rows = np.arange(0, N_TRAIN, 30)  # 20 training patches, as a coreset records them
    coreset = distilled(tmp_path / "random.zarr", tiles[rows], "random", rows)
    section, pairs = audit(coreset, tile_store, encoder, CFG)
    for space in ("pixel", "feature"):
        s = section["spaces"][space]
        assert s["memorised"] == 1.0 and s["synthetic_median"] == 0.0, space
        assert s["attack"]["sources"]["auc"] == 1.0 and s["attack"]["sources"]["members"] == 20
        assert s["attack"]["random"]["auc"] < 0.6  # the average patient is not exposed
        assert all(c["train_row"] in rows and c["distance"] == 0 for c in s["closest"])
        assert np.array_equal(pairs[space][0], pairs[space][1])  # each pair: a patch and itself
    assert section["attack_auc"] == 1.0 and section["attack_members"] == "sources"
    assert section["memorised"] == 1.0

    fake = distilled(tmp_path / "noise.zarr", noise(20))
    section, _ = audit(fake, tile_store, encoder, CFG)
    assert section["spaces"]["pixel"]["memorised"] == 0.0
    assert section["spaces"]["feature"]["memorised"] == 0.0
    assert section["memorised"] == 0.0 and section["spaces"]["pixel"]["median_ratio"] > 2


@pytest.mark.slow
def test_streamed_minima_do_not_depend_on_the_block_size(tile_store, tiles, encoder, tmp_path):
    images = np.concatenate([tiles[N_TRAIN + N_TEST:][:10], tiles[:10], noise(4)])
    path = distilled(tmp_path / "mixed.zarr", images, sources=np.arange(10))
    a, _ = audit(path, tile_store, encoder, CFG)
    b, _ = audit(path, tile_store, encoder, AuditConfig(**{**CFG.__dict__, "batch": 1000}))
    for space in ("pixel", "feature"):
        for key in ("synthetic_median", "heldout_median", "threshold"):
            assert a["spaces"][space][key] == pytest.approx(b["spaces"][space][key], abs=1e-5)
        for x, y in zip(a["spaces"][space]["closest"], b["spaces"][space]["closest"]):
            assert x["train_row"] == y["train_row"]
            assert x["distance"] == pytest.approx(y["distance"], abs=1e-6)
        for kind in ("random", "sources"):
            x, y = a["spaces"][space]["attack"][kind], b["spaces"][space]["attack"][kind]
            assert x["auc"] == pytest.approx(y["auc"], abs=1e-6)


def test_bootstrap_rank_auc_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 6, 40).astype(float)  # many ties
    nonmembers = rng.integers(2, 9, 55).astype(float)
    point = roc_auc_score(np.r_[np.ones(40), np.zeros(55)], -np.r_[members, nonmembers])
    lo, hi = bootstrap_auc(members, nonmembers, 400, seed=0)
    assert lo < point < hi and hi - lo < 0.35
    assert bootstrap_auc(members, nonmembers, 400, seed=0) == [lo, hi]  # seeded
    # a degenerate resample space: every resample is the sample itself
    assert bootstrap_auc(np.zeros(1), np.ones(1), 50, seed=0) == [1.0, 1.0]


def test_pixel_distance_is_the_rms_difference_and_blocks_match_brute_force():
    import torch

    from histodistill.privacy.audit import Space, sq_distances

    pixel = Space("pixel", None, torch.device("cpu"))
    black, white = np.zeros((1, 3, 4, 4), np.uint8), np.full((1, 3, 4, 4), 255, np.uint8)
    v = pixel.vectors(np.concatenate([black, white]))
    assert sq_distances(v[:1], v[1:]).sqrt().item() == pytest.approx(1.0)  # RMS of 1.0
    a, b = noise(5), noise(7, seed=2)
    diff = (a[:, None].astype(float) - b[None].astype(float)) / 255
    brute = np.sqrt((diff ** 2).mean((2, 3, 4)))
    np.testing.assert_allclose(sq_distances(pixel.vectors(a), pixel.vectors(b)).sqrt().numpy(),
                               brute, atol=1e-5)


def test_heldout_split_is_val_when_the_store_has_one(tiles, tmp_path):
    path = tmp_path / "v.zarr"
    writer = StoreWriter(path, SIZE, chunk=16, attrs={"class_names": ["a", "b"], "slides": [],
                                                       "split_names": list(SPLITS), "patch_size": SIZE})
    split = np.repeat([0, 1, 2], 40).astype(np.int8)  # train, val, test
    writer.append(tiles[:120], np.full((120, 2), -1), np.full(120, -1), np.arange(120) % 2, split)
    section, _ = audit(distilled(tmp_path / "s.zarr", tiles[200:204]), path, None, CFG)
    assert section["heldout_split"] == "val" and section["heldout_total"] == 40
    forced = AuditConfig(**{**CFG.__dict__, "heldout_split": "test"})
    assert audit(tmp_path / "s.zarr", path, None, forced)[0]["heldout_split"] == "test"


def test_control_set_keeps_apart_from_the_heldout_sample():
    from histodistill.privacy.audit import _null_rows

    rng = np.random.default_rng(0)
    split = np.r_[np.zeros(40), np.full(60, 2)].astype(np.int8)  # train, test
    labels = np.arange(100) % 2
    slides = np.r_[np.repeat(np.arange(4), 10), np.repeat(np.arange(4, 10), 10)]
    set_labels = np.array([0, 0, 0, 1, 1, 1])
    null, apart = _null_rows(split, labels, slides, "test", set_labels, rng)
    assert (split[null] == 2).all() and np.bincount(labels[null]).tolist() == [3, 3]
    assert set(null) <= set(apart) and len(set(slides[apart])) == 1  # one whole test slide
    assert set(slides[np.setdiff1d(np.flatnonzero(split == 2), apart)]).isdisjoint(slides[null])
    # without slide ids: rows, at most half of each class
    null, apart = _null_rows(split, labels, np.full(100, -1), "test", np.zeros(50, int), rng)
    assert len(null) == 15 and np.array_equal(null, apart)
    # val held out and test large enough: the control is test patches, nothing kept apart
    split = np.r_[np.zeros(40), np.ones(20), np.full(40, 2)].astype(np.int8)
    null, apart = _null_rows(split, labels, slides, "val", set_labels, rng)
    assert (split[null] == 2).all() and not np.isin(apart, np.flatnonzero(split == 1)).any()


def test_bad_inputs_are_named(tile_store, tiles, tmp_path):
    wrong = distilled(tmp_path / "wrong.zarr", np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(InputError, match="cannot be compared"):
        audit(wrong, tile_store, None, CFG)
    foreign = distilled(tmp_path / "foreign.zarr", tiles[:4], sources=np.array([0, 1, N_TRAIN, 3]))
    with pytest.raises(InputError, match="not all training rows"):
        audit(foreign, tile_store, None, CFG)
    with pytest.raises(InputError, match="split 'val' has no patches"):
        audit(foreign, tile_store, None,
              AuditConfig.from_config({**config.defaults("privacy"), "heldout_split": "val"}))


def _result(section: dict, method: str) -> dict:
    summary = {"acc": {"mean": 0.7, "std": 0.01, "runs": [0.7]}, "auc": {"mean": 0.8, "std": 0.02}}
    return {"dataset": "toy", "method": method, "ipc": 10, "patch": {"convnet": summary},
            "full": {"convnet": summary}, "distill": {"seconds": 3.0, "device": "cpu"},
            "config": {"distill": {"iterations": 3}, "seed": 0}, "versions": {"torch": "x"},
            "privacy": section}


def _package(tmp_path: Path, tile_store: Path, images: np.ndarray, method: str,
             sources: np.ndarray | None, encoder: Path | None, **settings) -> Path:
    zarr_path = distilled(tmp_path / f"{method}_ipc10.zarr", images, method, sources)
    section = privacy_audit(zarr_path, tile_store, encoder, cfg=CFG.__dict__,
                            out_json=tmp_path / "privacy.json", out_grid=tmp_path / "pairs.png")
    result = tmp_path / f"{method}_ipc10.json"
    result.write_text(json.dumps(_result(section, method)))
    out = tmp_path / f"{method}_ipc10.share"
    write_package(zarr_path, result, tile_store, out=out, datasheet_html=tmp_path / "datasheet.html",
                  settings={**PACKAGE, **settings})
    return out


def _decoded(share: Path) -> list[np.ndarray]:
    """Every image in the package, decoded: the PNGs and the zarr array, as (3, H, W)."""
    pngs = [np.asarray(Image.open(p)).transpose(2, 0, 1) for p in sorted(share.rglob("*.png"))]
    return pngs + list(zarr.open_group(str(share / "images.zarr"), mode="r")["images"][:])


@pytest.mark.slow
def test_distilled_package_has_no_real_patch_bytes_and_its_checksums_verify(tile_store, tiles,
                                                                            encoder, tmp_path):
    # stand-in for a distilled set: far from every real patch (the guard lets it through)
    images = noise(20)
    share = _package(tmp_path, tile_store, images, "dm", None, encoder)
    names = {p.relative_to(share).as_posix() for p in share.rglob("*") if p.is_file()}
    assert {"labels.csv", "DATASHEET.md", "manifest.json", "SHA256SUMS"} <= names
    assert len([n for n in names if n.endswith(".png")]) == 20
    decoded = _decoded(share)
    assert len(decoded) == 40 and all(any(np.array_equal(d, im) for im in images) for d in decoded)
    real = tiles[:N_TRAIN + N_TEST]
    blobs = [p.read_bytes() for p in share.rglob("*") if p.is_file()]
    for d in decoded:  # no decoded image is a real patch
        assert not (real == d).all((1, 2, 3)).any()
    for patch in real[::7]:  # no file holds a real patch's raw bytes, in either layout
        for raw in (patch.tobytes(), patch.transpose(1, 2, 0).tobytes()):
            assert not any(raw in b for b in blobs)
    # nothing points back at the real patches: no store rows, no store path
    text = (share / "manifest.json").read_text() + (share / "DATASHEET.md").read_text()
    assert "sources" not in zarr.open_group(str(share / "images.zarr"), mode="r")
    assert str(tile_store) not in text and "train_row" not in text
    verify_package(share)
    sheet = (share / "DATASHEET.md").read_text()
    for heading in ("Source cohort", "Method and settings", "Evaluation", "Privacy audit",
                    "Intended use", "Licence"):
        assert f"## {heading}" in sheet
    assert "CC-BY-4.0" in sheet and "No opt-in was needed" in sheet
    assert "<h2>Privacy audit</h2>" in (tmp_path / "datasheet.html").read_text()


@pytest.mark.slow
def test_manifest_catches_a_changed_missing_or_extra_file(tile_store, encoder, tmp_path):
    share = _package(tmp_path, tile_store, noise(20), "dm", None, encoder)
    verify_package(share)
    png = next(share.rglob("*.png"))
    original = png.read_bytes()
    png.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(InputError, match="checksum mismatch"):
        verify_package(share)
    png.unlink()
    with pytest.raises(InputError, match="missing"):
        verify_package(share)
    png.write_bytes(original)
    (share / "extra.txt").write_text("x")
    with pytest.raises(InputError, match="extra.txt: not in the manifest"):
        verify_package(share)


def test_a_set_without_an_audit_is_not_packaged(tile_store, tmp_path):
    result = tmp_path / "dm_ipc10.json"
    result.write_text(json.dumps({**_result({}, "dm"), "privacy": None}))
    with pytest.raises(InputError, match="has no privacy audit"):
        write_package(distilled(tmp_path / "d.zarr", noise(20)), result, tile_store,
                      out=tmp_path / "out.share", datasheet_html=tmp_path / "d.html", settings=PACKAGE)
    assert not (tmp_path / "out.share").exists()


@pytest.mark.slow
def test_coreset_package_is_refused_without_the_opt_in(tile_store, tiles, encoder, tmp_path):
    rows = np.arange(0, N_TRAIN, 30)
    with pytest.raises(InputError, match=r"random_ipc10 is a coreset.*privacy.memorised = 1.00"
                                         r".*allow_real_patches: true"):
        _package(tmp_path, tile_store, tiles[rows], "random", rows, encoder)
    assert not (tmp_path / "random_ipc10.share").exists()  # nothing partial
    assert not (tmp_path / "datasheet.html").exists()
    share = _package(tmp_path, tile_store, tiles[rows], "random", rows, encoder,
                     allow_real_patches=True)
    assert "OPT-IN allow_real_patches: true" in (share / "DATASHEET.md").read_text()
    assert json.loads((share / "manifest.json").read_text())["real_patches"] is True


@pytest.mark.slow
def test_memorised_synthetic_set_is_refused_without_the_opt_in(tile_store, tiles, encoder, tmp_path):
    # a "distilled" set holding two copies of training patches among noise
    images = noise(20)
    images[[3, 11]] = tiles[[5, 6]]
    with pytest.raises(InputError, match=r"dm_ipc10 has memorised images: privacy.memorised = "
                                         r"0.10 \(2 of 20 images.*allow_memorised: true"):
        _package(tmp_path, tile_store, images, "dm", None, encoder)
    share = _package(tmp_path, tile_store, images, "dm", None, encoder, allow_memorised=True)
    assert "OPT-IN allow_memorised: true" in (share / "DATASHEET.md").read_text()
