"""Slide level: MIL models (attention, order invariance, CLAM's clustering loss, TransMIL's
positional encoding), HDF5 bags, the training loop, per-slide distillation, transfer."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import zarr

from conftest import AUGMENT, ENCODER, TRAIN, method_settings
from histodistill import config
from histodistill.config import ConfigError, check_per_slide
from histodistill.data.stream import ClassSampler, record_channel_stats
from histodistill.data.store import SPLITS, PatchStore, StoreWriter, store_slides
from histodistill.distill.per_slide import distill_slides
from histodistill.io import InputError
from histodistill.mil import MODELS, build
from histodistill.mil.bags import (extract_real_bags, extract_synthetic_bags, read_bag,
                                   read_manifest, write_bag)
from histodistill.mil.clam import smooth_top1_svm
from histodistill.mil.train import Bags, run_model, bag_metrics, train_model
from histodistill.mil.transfer import centres
from histodistill.mil.transmil import PPEG, pinv_iterative, square_pad

# small and quick: each bag its own optimiser step, bags in shuffled order (no class weighting)
CFG = {"lr": 1e-3, "weight_decay": 1e-5, "epochs": 2, "weighted_sample": False, "grad_accum": 1}
SMALL = {name: {**config.defaults(f"mil.settings.{name}"), **CFG} for name in MODELS}
SMALL["transmil"].update(dim=32, landmarks=8)
ATTENTION = ("clam_sb", "clam_mb", "dsmil")  # TransMIL has no single attention over patches


def model(name: str, dim: int = 12, classes: int = 2, seed: int = 0, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(name, dim, classes, {**SMALL[name], **cfg}).eval()


def test_every_model_is_registered():
    assert set(MODELS) == set(SMALL)


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("classes", [2, 3])
def test_each_attention_sums_to_one_over_the_bag(name, classes):
    h = torch.randn(23, 12) * 3
    out = model(name, classes=classes)(h)
    assert out.attention.shape[1] == 23
    assert out.attention.shape[0] == {"clam_sb": 1, "clam_mb": classes,
                                      "dsmil": 1 if classes == 2 else classes}[name]
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(1), torch.ones(len(out.attention)))


@pytest.mark.parametrize("name", ATTENTION)
def test_clam_and_dsmil_are_invariant_to_patch_order(name):
    m = model(name)
    h = torch.randn(31, 12)
    perm = torch.randperm(31, generator=torch.Generator().manual_seed(1))
    a, b = m(h), m(h[perm])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.attention[:, perm], b.attention)  # attention follows its patch
    torch.testing.assert_close(m.probabilities(a), m.probabilities(b))


def test_transmil_positional_encoding_shape_contract():
    ppeg = PPEG(8)
    for n in (1, 2, 5, 16, 17, 50):
        x, side = square_pad(torch.randn(1, n, 8))
        assert side == int(np.ceil(np.sqrt(n))) and x.shape == (1, side * side, 8)
        assert torch.equal(x[0, :n], x[0, :n])  # the bag comes first, padding repeats it
        tokens = torch.cat([torch.randn(1, 1, 8), x], 1)
        out = ppeg(tokens, side, side)
        assert out.shape == tokens.shape
        assert torch.equal(out[:, 0], tokens[:, 0])  # the class token passes unchanged
    for conv in ppeg.convs:  # with zero kernels and biases the encoding is the identity
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    torch.testing.assert_close(ppeg(tokens, side, side), tokens)
    with pytest.raises(ValueError, match="do not fill a 3x3 map"):
        ppeg(torch.randn(1, 9, 8), 3, 3)


def test_transmil_takes_any_bag_size_and_uses_patch_positions():
    m = model("transmil")
    for n in (1, 3, 10, 40):
        assert m(torch.randn(n, 12)).logits.shape == (2,)
    h = torch.randn(16, 12)
    flipped = m(h.flip(0)).logits
    assert not torch.allclose(m(h).logits, flipped, atol=1e-5)  # PPEG sees the arrangement


def test_nystrom_pseudo_inverse_inverts_a_softmax_matrix():
    x = (torch.randn(2, 6, 6) * 2).softmax(-1)
    eye = torch.eye(6).expand(2, 6, 6)
    torch.testing.assert_close(x @ pinv_iterative(x, 20), eye, atol=1e-4, rtol=0)


def test_clam_instance_loss_uses_exactly_k_top_and_bottom_patches():
    """The clustering loss's gradient reaches exactly the k_sample patches of highest and the
    k_sample of lowest attention in the bag's class branch (attention indices are discrete)."""
    for name in ("clam_sb", "clam_mb"):
        m = model(name, k_sample=8, dropout=0.0)
        h = torch.randn(40, 12, requires_grad=True)
        out = m(h)
        label = 1
        loss = m.instance_loss(out.extra["hidden"], out.attention, label)
        (grad,) = torch.autograd.grad(loss, h)
        used = set(torch.nonzero(grad.abs().sum(1)).flatten().tolist())
        row = out.attention[label if name == "clam_mb" else 0].detach()
        order = row.argsort(descending=True).tolist()
        assert used == set(order[:8]) | set(order[-8:])
        top, bottom = m.instance_ids(row)
        assert set(top.tolist()) == set(order[:8]) and set(bottom.tolist()) == set(order[-8:])


def test_clam_small_bags_never_share_a_patch_between_top_and_bottom():
    m = model("clam_sb", k_sample=8)
    for n in (1, 2, 5, 10, 15, 16):
        top, bottom = m.instance_ids(torch.rand(n))
        k = min(8, n // 2)
        assert len(top) == len(bottom) == k and not set(top.tolist()) & set(bottom.tolist())
    h = torch.randn(1, 12)
    assert m.loss(h, 0)[0].isfinite()  # a one-patch bag: bag loss only


def test_smooth_svm_known_values():
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    want = [np.log(np.exp(0) + np.exp(-1)), np.log(np.exp(1) + np.exp(0))]
    torch.testing.assert_close(smooth_top1_svm(logits, y), torch.tensor(np.mean(want)).float())


def test_dsmil_binary_has_one_output_and_a_combined_score():
    m = model("dsmil")
    out = m(torch.randn(9, 12))
    assert out.logits.shape == (1,)
    p = m.probabilities(out)
    want = (out.logits.sigmoid() + out.extra["max_instance"].sigmoid()) / 2
    torch.testing.assert_close(p, torch.cat([1 - want, want]))


# ---- bags ---------------------------------------------------------------------------------------
def test_bag_round_trip_and_plain_h5py(tmp_path):
    f = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    c = np.arange(14).reshape(7, 2)
    path = write_bag(tmp_path / "s.h5", f, c, {"slide": "s", "label": "tumor", "centre": 1})
    bag = read_bag(path)
    assert np.array_equal(bag.features, f) and np.array_equal(bag.coords, c)
    assert bag.attrs["label"] == "tumor" and bag.attrs["centre"] == 1
    with h5py.File(path, "r") as h5:  # what CLAM's dataset_h5 reads
        assert set(h5.keys()) == {"features", "coords"}
        assert h5["features"].dtype == np.float32 and h5["features"].shape == (7, 5)
        assert np.array_equal(h5["coords"][:], c)


def test_bad_bags_give_one_clear_error_and_no_file(tmp_path):
    with pytest.raises(InputError, match=r"coords have shape \(6, 2\) but features \(7, 5\)"):
        write_bag(tmp_path / "a.h5", np.zeros((7, 5)), np.zeros((6, 2)), {})
    with pytest.raises(InputError, match="holds no patches"):
        write_bag(tmp_path / "b.h5", np.zeros((0, 5)), np.zeros((0, 2)), {})
    assert not list(tmp_path.iterdir())
    with h5py.File(tmp_path / "c.h5", "w") as h5:  # written by someone else, mismatched
        h5["features"] = np.zeros((4, 3), np.float32)
        h5["coords"] = np.zeros((3, 2))
    with pytest.raises(InputError, match=r"c\.h5.*expected \(4, 2\)"):
        read_bag(tmp_path / "c.h5")
    (tmp_path / "d.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="cannot be read as HDF5"):
        read_bag(tmp_path / "d.h5")


# ---- a small slide store ------------------------------------------------------------------------
# slide: (label, split, centre, patches of class 0, of class 1); m = 5 per class per slide
SLIDES = {"n1": ("normal", "train", 0, 12, 0), "t1": ("tumor", "train", 0, 3, 9),
          "n2": ("normal", "train", 1, 8, 0), "t2": ("tumor", "train", 1, 6, 2),
          "x1": ("normal", "test", -1, 7, 0), "x2": ("tumor", "test", -1, 2, 6)}


def slide_store(path) -> PatchStore:
    """A WSI-like store: the slides above, class 1 patches bright, class 0 dark."""
    rng = np.random.default_rng(0)
    writer = StoreWriter(path, 8, chunk=8, attrs={
        "class_names": ["normal", "tumor"], "split_names": list(SPLITS), "patch_size": 8,
        "slides": list(SLIDES), "skipped_slides": [],
        "slide_meta": {s: {"label": v[0], "centre": v[2]} for s, v in SLIDES.items()}})
    for i, (label, split, centre, n0, n1) in enumerate(SLIDES.values()):
        y = np.array([0] * n0 + [1] * n1)
        x = np.where(y[:, None, None, None] == 1, 170, 80) + rng.integers(0, 40, (len(y), 3, 8, 8))
        coords = np.stack([np.arange(len(y)) * 8, np.full(len(y), i)], 1)
        writer.append(x.astype(np.uint8), coords, np.full(len(y), i), y,
                      np.full(len(y), SPLITS.index(split)))
    record_channel_stats(path)
    return PatchStore(path)


@pytest.fixture(scope="module")
def slide_patches(tmp_path_factory) -> PatchStore:
    return slide_store(tmp_path_factory.mktemp("slides") / "p.zarr")


def test_store_slides_lists_labels_centres_and_rows(slide_patches):
    slides = {s.name: s for s in store_slides(slide_patches)}
    assert list(slides) == list(SLIDES)
    assert slides["t2"].label == "tumor" and slides["t2"].centre == 1 and slides["x1"].split == "test"
    labels = slide_patches.array("label")
    assert np.bincount(labels[slides["t1"].rows], minlength=2).tolist() == [3, 9]


def test_class_sampler_on_one_slide_draws_only_its_rows(slide_patches):
    rows = {s.name: s for s in store_slides(slide_patches)}["n2"].rows
    s = ClassSampler(slide_patches, "train", cache_mb=1, seed=0, rows=rows)
    assert s.counts.tolist() == [8, 0] and np.array_equal(s.selected_rows, rows)
    assert s.mixed(16)[1].tolist() == [0] * 16
    with pytest.raises(ValueError, match="'tumor' .* no patches in the sampled rows"):
        s.batch(1, 2)
    with pytest.raises(ValueError, match="not in split 'train'"):
        ClassSampler(slide_patches, "train", 1, 0, rows={s.name: s for s in store_slides(slide_patches)}["x1"].rows)


PER_SLIDE = {
    "random": method_settings("random"),
    "dc": method_settings("dc", net="convnet", net_kwargs={"width": 8, "norm": "none"}, iterations=2,
                          outer_loop=2, inner_loop=2, lr_img=0.1, lr_net=0.01, batch_real=8,
                          checkpoint_every=1),
    "dm": method_settings("dm", net="convnet", net_kwargs={"width": 8, "norm": "none"}, iterations=2,
                          lr_img=1.0, batch_real=8, augment={**AUGMENT, "preset": "dsa"},
                          checkpoint_every=1),
}


@pytest.mark.parametrize("method", sorted(PER_SLIDE))
def test_per_slide_distillation_yields_m_per_class_per_slide_and_no_more(method, slide_patches, tmp_path):
    out = distill_slides(slide_patches.path, None, pool_path=None, method=method, ipc=5,
                         cfg=PER_SLIDE[method], seed=0, slides=["n1", "t1", "n2", "t2"],
                         out=tmp_path / "b", cache_mb=64, progress=False)
    for name in ("n1", "t1", "n2", "t2"):
        group = zarr.open_group(str(out / f"{name}.zarr"), mode="r")
        counts = np.bincount(group["labels"][:], minlength=2).tolist()
        _, _, _, n0, n1 = SLIDES[name]
        assert counts == [min(5, n0), min(5, n1)]  # m per class present; all n < m; none absent
        assert group["images"].shape == (sum(counts), 3, 8, 8)
        assert group.attrs["real_counts"] == [n0, n1]
    assert sorted(p.name for p in out.iterdir()) == ["n1.zarr", "n2.zarr", "t1.zarr", "t2.zarr"]


def test_random_per_slide_keeps_real_patches_of_that_slide(slide_patches, tmp_path):
    out = distill_slides(slide_patches.path, None, pool_path=None, method="random", ipc=5, cfg={},
                         seed=0, slides=["t1"], out=tmp_path / "b", cache_mb=64, progress=False)
    images = zarr.open_group(str(out / "t1.zarr"), mode="r")["images"][:]
    rows = {s.name: s for s in store_slides(slide_patches)}["t1"].rows
    own = slide_patches.patches(rows).reshape(len(rows), -1)
    assert all((own == img.reshape(-1)).all(1).any() for img in images)


def _crash_before(monkeypatch, slide_name):
    """Make per-slide distillation die (as a kill would) when it reaches ``slide_name``."""
    import histodistill.distill.per_slide as per_slide

    real = per_slide._distil_one

    def crashing(store_, slide, *args, **kwargs):
        if slide.name == slide_name:
            raise KeyboardInterrupt
        return real(store_, slide, *args, **kwargs)

    monkeypatch.setattr(per_slide, "_distil_one", crashing)
    return lambda: monkeypatch.setattr(per_slide, "_distil_one", real)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [None, "chunk", "attrs"])
def test_per_slide_distillation_resumes_slide_by_slide_and_redoes_a_damaged_slide(
        slide_patches, tmp_path, monkeypatch, damage):
    clean = distill_slides(slide_patches.path, None, pool_path=None, method="dm", ipc=5,
                           cfg=PER_SLIDE["dm"], seed=0, slides=["n1", "t1"], out=tmp_path / "clean",
                           cache_mb=64, progress=False)
    out, partial = tmp_path / "b", tmp_path / "b.partial"
    restore = _crash_before(monkeypatch, "t1")
    with pytest.raises(KeyboardInterrupt):
        distill_slides(slide_patches.path, None, pool_path=None, method="dm", ipc=5,
                       cfg=PER_SLIDE["dm"], seed=0, slides=["n1", "t1"], out=out, cache_mb=64,
                       progress=False)
    restore()
    n1 = partial / "n1.zarr"
    if damage == "chunk":  # a chunk of the finished slide's images lost
        next(p for p in sorted((n1 / "images").rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    elif damage == "attrs":
        (n1 / "zarr.json").write_text("{not json")
    stamp = (n1 / "zarr.json").stat().st_mtime_ns
    distill_slides(slide_patches.path, None, pool_path=None, method="dm", ipc=5, cfg=PER_SLIDE["dm"],
                   seed=0, slides=["n1", "t1"], out=out, cache_mb=64, progress=False)
    assert ((out / "n1.zarr" / "zarr.json").stat().st_mtime_ns == stamp) == (damage is None)
    assert not partial.exists() and sorted(p.name for p in out.iterdir()) == ["n1.zarr", "t1.zarr"]
    for name in ("n1.zarr", "t1.zarr"):  # ends identical to the uninterrupted run
        a, b = (zarr.open_group(str(d / name), mode="r") for d in (clean, out))
        assert np.array_equal(a["images"][:], b["images"][:])


def test_per_slide_bad_requests_give_one_clear_error(slide_patches, tmp_path):
    with pytest.raises(InputError, match="'forgetting' cannot run per slide"):
        distill_slides(slide_patches.path, None, pool_path=None, method="forgetting", ipc=5, cfg={}, seed=0,
                       slides=["n1"], out=tmp_path / "a", cache_mb=64)
    with pytest.raises(ConfigError, match="'herding' cannot run per slide"):
        check_per_slide("herding")
    with pytest.raises(InputError, match="'nope' is not in the store"):
        distill_slides(slide_patches.path, None, pool_path=None, method="random", ipc=5, cfg={}, seed=0,
                       slides=["nope"], out=tmp_path / "a", cache_mb=64)
    with pytest.raises(InputError, match="'x1' is a test slide"):
        distill_slides(slide_patches.path, None, pool_path=None, method="random", ipc=5, cfg={}, seed=0,
                       slides=["x1"], out=tmp_path / "a", cache_mb=64)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()


def test_a_store_without_slides_is_refused(tmp_path):
    from conftest import make_toy_store

    with pytest.raises(InputError, match="records no slides"):
        store_slides(PatchStore(make_toy_store(tmp_path / "t.zarr")))


# ---- extraction, training, transfer -------------------------------------------------------------
@pytest.fixture(scope="module")
def bags(slide_patches, tmp_path_factory):
    """Real and random per-slide bags of the slide store, with a small trained encoder."""
    from histodistill.encoders import train_encoder

    work = tmp_path_factory.mktemp("bags")
    enc = work / "enc.pt"
    train_encoder(slide_patches.path, enc, {**ENCODER, "kind": "supervised",
                                    "net": "convnet", "seed": 0,
                                    "net_kwargs": {"width": 8, "norm": "batchnorm"},
                                    "train": {**TRAIN, "epochs": 3, "batch": 16, "lr": 0.01}},
                  cache_mb=64)
    real = extract_real_bags(slide_patches.path, enc, work / "real", batch=5, progress=False)
    distilled = distill_slides(slide_patches.path, None, pool_path=None, method="random", ipc=5,
                               cfg={}, seed=0, slides=["n1", "t1", "n2", "t2"], out=work / "d",
                               cache_mb=64, progress=False)
    syn = extract_synthetic_bags([distilled], enc, work / "syn", batch=256, progress=False)
    return real, syn, distilled


@pytest.mark.slow
def test_extracted_bags_match_their_slides(slide_patches, bags):
    real, syn, _ = bags
    rows = {r["slide_id"]: r for r in read_manifest(real)}
    assert list(rows) == list(SLIDES) and rows["x2"]["split"] == "test" and rows["t2"]["centre"] == 1
    coords = slide_patches.array("coords")
    for s in store_slides(slide_patches):
        bag = read_bag(real / f"{s.name}.h5")
        assert bag.features.shape[0] == len(s.rows) and np.array_equal(bag.coords, coords[s.rows])
    syn_rows = {r["slide_id"]: r for r in read_manifest(syn)}
    assert {k: v["patches"] for k, v in syn_rows.items()} == {"n1": 5, "n2": 5, "t1": 8, "t2": 7}
    assert (read_bag(syn / "t1.h5").coords == -1).all()


def test_bag_extraction_resumes_and_redoes_a_damaged_bag(slide_patches, bags, tmp_path, monkeypatch):
    """A crash before the first bag leaves nothing; a crash mid-extraction keeps the finished,
    sealed bags; one damaged after it is redone; the result equals the uninterrupted
    extraction."""
    import histodistill.mil.bags as bag_module

    real, _, _ = bags
    enc = real.parent / "enc.pt"
    out = tmp_path / "real"
    original, calls = bag_module._embed_rows, []

    def crashing(encoder, store_, split, rows, *args):
        calls.append(len(rows))
        if len(calls) == crash:
            raise KeyboardInterrupt
        return original(encoder, store_, split, rows, *args)

    monkeypatch.setattr(bag_module, "_embed_rows", crashing)
    crash = 1
    with pytest.raises(KeyboardInterrupt):
        extract_real_bags(slide_patches.path, enc, out, batch=5, progress=False)
    assert not (tmp_path / "real.partial").exists()  # nothing finished: nothing left
    crash, calls[:] = 3, []
    with pytest.raises(KeyboardInterrupt):
        extract_real_bags(slide_patches.path, enc, out, batch=5, progress=False)
    first = sorted((tmp_path / "real.partial").glob("*.h5"))[0]
    first.write_bytes(first.read_bytes()[:-64])  # truncated after it was sealed
    crash, calls[:] = 0, []
    extract_real_bags(slide_patches.path, enc, out, batch=5, progress=False)
    assert len(calls) == len(SLIDES) - 1  # the intact finished bag was kept
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in real.iterdir())
    for name in SLIDES:
        assert np.array_equal(read_bag(out / f"{name}.h5").features,
                              read_bag(real / f"{name}.h5").features)


@pytest.mark.slow
def test_training_learns_a_separable_bag_task():
    """Tumour bags hold a few patches with a raised first feature; every model learns it."""
    rng = np.random.default_rng(0)

    class Toy(Bags):
        def __init__(self, n):
            self.labels = np.arange(n) % 2
            self.dim, self._bags = 6, []
            for y in self.labels:
                h = rng.normal(size=(int(rng.integers(8, 20)), 6)).astype(np.float32)
                if y:
                    h[:3, 0] += 4
                self._bags.append(torch.from_numpy(h))

        def __len__(self):
            return len(self.labels)

        def features(self, i):
            return self._bags[i]

    train, test = Toy(24), Toy(20)
    for name in sorted(MODELS):
        epochs, lr = (40, 1e-2) if name == "dsmil" else (25, 2e-3)  # DSMIL learns slower
        m, times, curve = train_model(name, {**SMALL[name], "epochs": epochs, "lr": lr}, train, 2, 0)
        assert len(times) == epochs and len(curve["loss"]) == epochs
        assert bag_metrics(m, test)["acc"] >= 0.9, name


def test_runs_resume_and_are_seeded(bags, tmp_path):
    real, syn, _ = bags
    classes = ["normal", "tumor"]
    train, test = Bags(syn, classes, "train", cache_mb=64), Bags(real, classes, "test", cache_mb=64)
    resume = tmp_path / "r.json"
    a = run_model("clam_sb", SMALL["clam_sb"], train, test, 2, 2, 0, resume, progress=False)
    assert resume.exists()
    b = run_model("clam_sb", SMALL["clam_sb"], train, test, 2, 2, 0, None, progress=False)
    assert a["acc"]["runs"] == b["acc"]["runs"] and a["auc"]["runs"] == b["auc"]["runs"]
    with pytest.raises(InputError, match="no bags of split 'test' and centres \\[0\\]"):
        Bags(syn, classes, "test", [0], cache_mb=64)


def test_transfer_needs_two_centres(slide_patches, tmp_path):
    assert centres(slide_patches) == [0, 1]
    from conftest import make_toy_store

    with pytest.raises(InputError, match="records no slides"):
        centres(PatchStore(make_toy_store(tmp_path / "t.zarr")))


# ---- tables and report --------------------------------------------------------------------------
def _metric(acc: float) -> dict:
    return {"mean": acc, "std": 0.0, "runs": [acc]}


def test_slide_and_transfer_tables_come_from_the_result_files(tmp_path):
    import json

    from histodistill import tables
    from histodistill.report import report_targets

    run = {"acc": _metric(0.75), "auc": _metric(0.8), "epoch_time_s": 0.01, "train_time_s": 1.0}
    full = {**run, "acc": _metric(0.9), "epoch_time_s": 0.1}
    slide = {"encoder": "simclr", "test_slides": 12,
             "bags": {"synthetic": {"bag_gb": 1e-4}, "full": {"bag_gb": 1e-3}},
             "models": {"clam_sb": {"synthetic": run, "full": full}}}
    folder = tmp_path / "results" / "toy"
    folder.mkdir(parents=True)
    (folder / "histodd_ipc10.json").write_text(json.dumps({"method": "histodd", "ipc": 10,
                                                          "slide": slide}))
    level = {"pretrained": {"acc": _metric(0.5)}, "synthetic": {**run, "storage_gb": 1e-3,
             "bag_gb": 1e-4}, "full": {**full, "storage_gb": 1e-2, "bag_gb": 1e-3}}
    transfer = {"method": "histodd", "ipc": 10, "config": {"transfer": {"runs": 2, "finetune": {"epochs": 5}}},
                "directions": [{"target": 0, "source": 1, "patch": {**level, "arch": "convnet"},
                                "slide": {**level, "model": "clam_sb"}}]}
    (folder / "transfer_histodd_ipc10.json").write_text(json.dumps(transfer))
    assert [p.name for p in tables.result_files(folder)] == ["histodd_ipc10.json"]
    assert report_targets(tmp_path) == ["results/toy/report/histodd_ipc10_curves.png"]
    text = tables.slide_table(folder)
    assert "| histodd | 10 | clam_sb | 75.0 ± 0.0 | 90.0 ± 0.0 | 80.0 ± 0.0 |" in text
    assert "| 0.010 / 0.100 | 0.10 / 1.00 |" in text and "12 real test slides" in text
    text = tables.transfer_table(folder)
    assert "| histodd | 10 | 0 <- 1 | patch (convnet) | 50.0 ± 0.0 | 75.0 ± 0.0 | 90.0 ± 0.0 |" in text
    assert "| slide (clam_sb) |" in text and "| 1.00 / 10.00 |" in text


@pytest.mark.slow
def test_transfer_runs_both_directions_and_records_storage(slide_patches, bags, tmp_path):
    from histodistill.mil.transfer import transfer

    real, syn, distilled = bags
    cfg = {"transfer": {"patch_arch": "convnet", "model": "clam_sb", "runs": 1, "seed": 0,
                        "pretrain": {**TRAIN, "epochs": 1, "batch": 16},
                        "finetune": {**TRAIN, "epochs": 2, "batch": 16, "lr": 0.001}},
           "model_settings": SMALL["clam_sb"], "arch_kwargs": {"width": 8, "norm": "batchnorm"},
           "augment": {**AUGMENT, "preset": "none"}, "stain_norm": False}
    out = transfer(slide_patches.path, None, distilled=[distilled], real_bags=real,
                   synthetic_bags=syn, cfg=cfg, dataset="toy", method="random", ipc=5,
                   out=tmp_path / "t.json", cache_mb=64)
    assert [(d["target"], d["source"]) for d in out["directions"]] == [(0, 1), (1, 0)]
    d = out["directions"][0]  # fine-tuned on centre 1: slides n2 (5 synthetic) and t2 (5 + 2)
    assert d["patch"]["synthetic"]["patches"] == 12 and d["patch"]["full"]["patches"] == 16
    assert d["patch"]["synthetic"]["epochs"] == 2 and d["slide"]["synthetic"]["epochs"] == 2
    assert d["slide"]["synthetic"]["patches"] == 12 and d["slide"]["full"]["slides"] == 2
    assert d["patch"]["synthetic"]["storage_gb"] == 12 * 3 * 8 * 8 / 1e9
    assert 0 <= d["slide"]["pretrained"]["acc"]["mean"] <= 1
    assert (tmp_path / "t.json").exists()
