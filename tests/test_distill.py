"""Distillation methods: matching, model augmentation, siamese augmentation, image spaces and
clamping, resume, coresets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import zarr

from conftest import AUGMENT, TRAIN, make_toy_store, method_settings
from histodistill import models
from histodistill.augment import Augment
from histodistill.data.real import RealData
from histodistill.distill import METHODS, Context, build
from histodistill.distill.coreset import herding_order
from histodistill.distill.matching import match_loss, matched_params, model_augment
from histodistill.state import save_state
from histodistill.data.store import fingerprint
from histodistill.data.store import PatchStore

NET = {"width": 8, "norm": "none"}


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> PatchStore:
    return PatchStore(make_toy_store(tmp_path_factory.mktemp("toy") / "p.zarr"))


def pool(seed: int = 0, size: int = 16, n: int = 2) -> dict:
    states = []
    for k in range(n):
        torch.manual_seed(seed + k)
        states.append(models.build("convnet", 2, size, **NET).state_dict())
    return {"net": "convnet", "net_kwargs": NET, "states": states}


def context(toy_store: PatchStore, checkpoint=None, seed: int = 0, cache_mb: float = 64) -> Context:
    real = RealData(toy_store, "train", cache_mb, seed, torch.device("cpu"))
    return Context(real, seed, None, checkpoint, pool(), progress=False)


SETTINGS = {
    "histodd": method_settings("histodd", outer_loop=4, inner_loop=2, lr_img=0.5, unit_grad=True,
                               lr_net=0.01, alpha=[0.01, 0.09], n_data=16, batch_real=8, batch_net=8,
                               augment={**AUGMENT, "ops": ["flip", "rotate"]}, checkpoint_every=1),
    "dc": method_settings("dc", net="convnet", net_kwargs=NET, iterations=3, outer_loop=2, inner_loop=2,
                          lr_img=0.1, lr_net=0.01, batch_real=8, checkpoint_every=1),
    "dsa": method_settings("dsa", net="convnet", net_kwargs=NET, iterations=3, outer_loop=2,
                           inner_loop=2, lr_img=0.1, lr_net=0.01, batch_real=8,
                           augment={**AUGMENT, "preset": "dsa"}, checkpoint_every=1),
    "dm": method_settings("dm", net="convnet", net_kwargs=NET, iterations=4, lr_img=1.0, batch_real=8,
                          augment={**AUGMENT, "preset": "dsa"}, checkpoint_every=1),
    "random": method_settings("random"),
    "herding": method_settings("herding", net="convnet", net_kwargs=NET,
                               train={**TRAIN, "epochs": 2, "batch": 16}),
    "forgetting": method_settings("forgetting", net="convnet", net_kwargs=NET,
                                  train={**TRAIN, "epochs": 3, "batch": 16}),
}


def test_every_method_is_registered_and_configured_here():
    # trajectory matching needs an expert buffer (tests/test_trajectories.py); the latent methods
    # distil through an autoencoder (tests/test_latent_distill.py)
    assert set(METHODS) == set(SETTINGS) | {"mtt", "ptm", "glad", "slfd"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_method_returns_ipc_images_per_class(method, toy_store):
    images, labels = build(method, SETTINGS[method], 3, context(toy_store)).run()
    assert images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    if method in ("random", "herding", "forgetting"):  # coresets hold real patches of their class
        x = torch.from_numpy(toy_store.patches()).float() / 255
        y = torch.from_numpy(toy_store.array("label"))
        train = torch.from_numpy(toy_store.array("split") == 0)
        for img, lab in zip(images, labels):
            match = ((x == img).flatten(1).all(1) & train).nonzero().flatten()
            assert len(match) >= 1 and (y[match] == lab).all()


def test_synthetic_images_stay_in_range_after_a_huge_gradient(toy_store):
    """Every image step clamps: a step of size 1e6 cannot leave [0, 1] (in either space)."""
    for method in ("histodd", "dm"):
        cfg = {**SETTINGS[method], "lr_img": 1e6, "unit_grad": False}
        d = build(method, cfg, 2, context(toy_store))
        d.init_state()
        d.step(0)
        pixels = d.result()
        assert pixels.min() >= 0 and pixels.max() <= 1
        if d.space == "pixel":
            assert d.images.min() >= 0 and d.images.max() <= 1
        else:  # normalised space: clamped to where pixels 0 and 1 land, per channel
            lo, hi = context(toy_store).stats.bounds(d.images)
            assert (d.images >= lo - 1e-6).all() and (d.images <= hi + 1e-6).all()
        assert ((pixels == 0) | (pixels == 1)).float().mean() > 0.2  # the step really was huge


def test_image_spaces_follow_the_references(toy_store):
    assert METHODS["histodd"].space == "pixel"  # Acc-DD/IDC: [0, 1], normalised in the pipeline
    for method in ("dc", "dsa", "dm"):
        assert METHODS[method].space == "normalised"  # DC/DM reference code
    d = build("dm", SETTINGS["dm"], 2, context(toy_store))
    d.init_state()
    stats = context(toy_store).stats
    torch.testing.assert_close(stats.pixels(d.images.detach()), d.result(), atol=1e-6, rtol=0)


def test_network_inputs_are_normalised_with_the_store_statistics(toy_store):
    """What reaches the network during distillation has per-channel mean ~0 and std ~1 over
    the real data (the store's channel statistics)."""
    seen = []
    d = build("dm", {**SETTINGS["dm"], "augment": {**AUGMENT, "preset": "none"}, "batch_real": 24}, 2,
              context(toy_store))
    d.init_state()
    real = torch.cat([d.real_batch(c, 24) for c in range(2)])
    assert real.mean((0, 2, 3)).abs().max() < 0.05
    assert (real.std((0, 2, 3)) - 1).abs().max() < 0.05
    net = d.new_net("convnet", NET)
    net.body[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    net.embed(d.syn(0))
    stats = context(toy_store).stats
    torch.testing.assert_close(seen[0], stats.normalise(d.result()[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("width,batch,scale", [(8, 8, 1.0), (32, 24, 1.0), (8, 8, 1e4)])
def test_unit_grad_bounds_the_image_update_whatever_the_loss_scale(toy_store, width, batch, scale):
    """With unit_grad each image moves at most lr_img / (1 - momentum) per step (L2 norm), for
    any network width, batch size or loss scale; without it the step grows with the scale."""
    lr = 0.5
    moves = {}
    for unit in (True, False):
        d = build("dm", {**SETTINGS["dm"], "net_kwargs": {"width": width, "norm": "none"},
                         "batch_real": batch, "lr_img": lr, "unit_grad": unit,
                         "augment": {**AUGMENT, "preset": "none"}}, 2, context(toy_store))
        d.space = "pixel"  # measure in pixels; the clamp only ever shortens a step
        d.init_state()
        worst = 0.0
        for _ in range(3):
            before = d.images.detach().clone()
            net = d.new_net("convnet", {"width": width, "norm": "none"})
            loss = scale * sum(((net.embed(d.real_batch(c, batch)).mean(0)
                                 - net.embed(d.syn(c)).mean(0)) ** 2).sum() for c in range(2))
            d.image_step(loss)
            worst = max(worst, float((d.images.detach() - before).flatten(1).norm(dim=1).max()))
        moves[unit] = worst
    assert moves[True] <= lr / (1 - 0.5) + 1e-5
    if scale > 1:
        assert moves[False] > 10 * moves[True]


@pytest.mark.slow
@pytest.mark.parametrize("distance", ["l1", "cos"])
def test_matching_distance_is_zero_for_identical_batches_and_images_move_to_reduce_it(distance):
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, width=8, norm="instancenorm")  # DC's network
    params = matched_params(net, distance, include_fc=True)
    g = torch.Generator().manual_seed(0)
    real, y_real = torch.randn(8, 3, 16, 16, generator=g) - 0.5, torch.zeros(8, dtype=torch.long)
    zero = match_loss(net, params, real, y_real, real.clone(), y_real, distance).item()
    assert zero == pytest.approx(0, abs=1e-4)
    syn = (torch.randn(4, 3, 16, 16, generator=g) + 1).requires_grad_(True)
    y_syn = torch.zeros(4, dtype=torch.long)
    opt = torch.optim.Adam([syn], lr=0.01)
    losses = []
    for _ in range(30):
        loss = match_loss(net, params, real, y_real, syn, y_syn, distance)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_l1_matching_skips_biases_norms_and_head_unless_asked():
    net = models.build("convnet", 2, 16, width=8, norm="instancenorm")
    assert all(p.dim() == 4 for p in matched_params(net, "l1", include_fc=False))
    assert any(p.dim() == 2 for p in matched_params(net, "l1", include_fc=True))
    assert len(matched_params(net, "cos", True)) == len(list(net.parameters()))


def test_model_augmentation_fixed_step_gives_each_filter_a_perturbation_of_norm_alpha_w():
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, width=8, norm="instancenorm")
    before = copy.deepcopy(net.state_dict())
    model_augment(net, 0.05, torch.Generator().manual_seed(1), directions=1)
    for name, after in net.state_dict().items():
        delta = after - before[name]
        if after.dim() >= 2:
            ratio = delta.flatten(1).norm(dim=1) / before[name].flatten(1).norm(dim=1)
            torch.testing.assert_close(ratio, torch.full_like(ratio, 0.05))
        else:
            assert torch.equal(delta, torch.zeros_like(delta))


def test_model_augmentation_draws_acc_dd_steps_from_the_range_with_random_signs():
    net = models.build("convnet", 2, 16, width=8, norm="none")
    gen = torch.Generator().manual_seed(0)
    steps = [s for _ in range(50) for s in model_augment(net, [0.01, 0.09], gen, directions=2)]
    assert len(steps) == 100 and all(0.01 <= abs(s) <= 0.09 for s in steps)
    assert min(steps) < 0 < max(steps) and np.std(np.abs(steps)) > 0.015


def test_histodd_follows_algorithm_1_one_image_step_per_class_then_a_pass_over_n_data(toy_store,
                                                                                     monkeypatch):
    cfg = {**SETTINGS["histodd"], "outer_loop": 1, "inner_loop": 3, "n_data": 20, "batch_net": 8}
    d = build("histodd", cfg, 2, context(toy_store))
    d.init_state()
    events = []
    image_step = d.image_step
    monkeypatch.setattr(d, "image_step", lambda loss: (events.append("img"), image_step(loss)))
    mixed = d.ctx.real.mixed
    monkeypatch.setattr(d.ctx.real, "mixed", lambda n: (events.append(f"net{n}"), mixed(n))[1])
    d.step(0)
    # per inner loop: one image step per class (2), then ceil(20 / 8) = 3 network batches of 8
    assert events == ["img", "img", "net8", "net8", "net8"] * 3


def test_real_and_synthetic_batches_get_identical_augmentation(toy_store, monkeypatch):
    calls = []
    real_apply = Augment.apply

    def spy(self, x, params):
        calls.append((x.shape[0], params))
        return real_apply(self, x, params)

    monkeypatch.setattr(Augment, "apply", spy)
    cfg = {**SETTINGS["histodd"], "outer_loop": 1, "inner_loop": 2, "batch_net": 5,
           "augment": {**AUGMENT, "preset": "dsa", "mode": "all"}}
    build("histodd", cfg, 3, context(toy_store)).run()
    matches = [c for c in calls if c[0] in (8, 3)]  # (real batch, synthetic class) pairs
    pairs = list(zip(matches[::2], matches[1::2]))
    assert len(pairs) == 2 * 2  # inner loops x classes
    for (n_real, p_real), (n_syn, p_syn) in pairs:
        assert (n_real, n_syn) == (8, 3) and p_real is p_syn and len(p_real) == 6
        assert all(v.numel() == 1 for _, p in p_real for v in p.values())  # one draw, shared
    assert pairs[0][0][1] != pairs[1][0][1]  # fresh parameters for every match
    nets = [c for c in calls if c[0] == 5]  # network updates: a draw per image
    assert nets and all(v.numel() == 5 for _, p in nets[0][1] for v in p.values())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["histodd", "dc", "dm"])
def test_interrupted_run_resumes_to_the_same_result(method, toy_store, tmp_path):
    cfg = SETTINGS[method]
    for cache_mb in (64, 0.004):  # whole split in memory; a small reservoir refreshed per draw
        reference, _ = build(method, cfg, 2, context(toy_store, cache_mb=cache_mb)).run()
        ckpt = tmp_path / f"{method}_{cache_mb}.ckpt"
        partial, _ = build(method, cfg, 2, context(toy_store, ckpt, cache_mb=cache_mb)).run(stop_after=2)
        assert ckpt.exists() and not torch.equal(partial, reference)
        resumed, _ = build(method, cfg, 2, context(toy_store, ckpt, cache_mb=cache_mb)).run()
        torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_from_other_settings_or_inputs_is_ignored(toy_store, tmp_path):
    ckpt = tmp_path / "h.ckpt"
    build("histodd", SETTINGS["histodd"], 2, context(toy_store, ckpt)).run(stop_after=1)
    other = {**SETTINGS["histodd"], "lr_img": 0.2}
    fresh, _ = build("histodd", other, 2, context(toy_store)).run()
    resumed, _ = build("histodd", other, 2, context(toy_store, ckpt)).run()
    torch.testing.assert_close(resumed, fresh, rtol=0, atol=1e-6)
    build("histodd", SETTINGS["histodd"], 2, context(toy_store, ckpt)).run(stop_after=1)
    ctx = context(toy_store, ckpt)
    ctx.fingerprint = "another pool"
    fresh, _ = build("histodd", SETTINGS["histodd"], 2, context(toy_store)).run()
    resumed, _ = build("histodd", SETTINGS["histodd"], 2, ctx).run()
    torch.testing.assert_close(resumed, fresh, rtol=0, atol=1e-6)


def test_same_seed_same_result_other_seed_other_result(toy_store):
    a, _ = build("dm", SETTINGS["dm"], 2, context(toy_store, seed=0)).run()
    b, _ = build("dm", SETTINGS["dm"], 2, context(toy_store, seed=0)).run()
    c, _ = build("dm", SETTINGS["dm"], 2, context(toy_store, seed=1)).run()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_histodd_starts_from_the_random_coreset(toy_store):
    start, _ = build("random", {}, 3, context(toy_store)).run()
    cfg = {**SETTINGS["histodd"], "lr_img": 0.0}
    images, _ = build("histodd", cfg, 3, context(toy_store)).run()
    torch.testing.assert_close(images, start)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_every_set_records_the_real_rows_it_was_made_from(method, toy_store, tmp_path):
    """The privacy audit's most exposed members: a coreset's picks, a real initialisation."""
    from histodistill.distill.run import distill

    out, pool_file = tmp_path / "d.zarr", tmp_path / "pool.pt"
    save_state(pool(), pool_file)
    distill(method, 3, SETTINGS[method], 0, {"zarr": out, "grid": tmp_path / "d.png", "cost": tmp_path / "d.json"},
            store_path=toy_store.path, template_path=None, pool_path=pool_file, checkpoint=None,
            cache_mb=64, progress=False)
    group = zarr.open_group(str(out), mode="r")
    sources, labels = group["sources"][:], group["labels"][:]
    assert len(sources) == 6 and (toy_store.array("split")[sources] == 0).all()  # training rows
    assert (toy_store.array("label")[sources] == labels).all()  # each image's own class
    if METHODS[method].real_patches:  # coresets are exactly those patches
        assert np.array_equal(group["images"][:], toy_store.patches()[sources])
    else:  # the rest start from the random coreset
        assert np.array_equal(sources, build("random", {}, 3, context(toy_store)).random_rows())
    assert METHODS[method].real_patches == (method in ("random", "herding", "forgetting"))


def test_histodd_without_pool_and_too_few_patches_are_clear_errors(toy_store):
    ctx = context(toy_store)
    ctx.pool = {}
    with pytest.raises(ValueError, match="needs the pre-trained network pool"):
        build("histodd", SETTINGS["histodd"], 2, ctx).run()
    with pytest.raises(ValueError, match="fewer than ipc=100"):
        build("random", {}, 100, context(toy_store))
    with pytest.raises(KeyError, match="unknown distillation method 'gm'"):
        build("gm", {}, 2, context(toy_store))
    with pytest.raises(ValueError, match="mtt needs the expert trajectories"):
        build("mtt", {}, 2, context(toy_store)).run()


def test_herding_known_answer():
    feats = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.2]])
    # the mean is 5.04: first the closest point, then the pair that keeps the mean closest
    assert herding_order(feats, 3) == [4, 2, 3]


def test_forgetting_keeps_the_most_forgotten(toy_store, monkeypatch):
    import histodistill.distill.coreset as coreset

    train_rows = np.flatnonzero(toy_store.array("split") == 0)  # classes alternate: even rows are 0
    flips = {0: [True, False, True, False], 4: [True, False, False, False],
             7: [True, False, True, False]}

    def fake_train(net, batches, cfg, gen, aug=None, on_epoch=None, progress=False, **_):
        rows = torch.from_numpy(train_rows)
        for epoch in range(4):  # rows 0 and 7 are forgotten twice, row 4 once, others never
            correct = torch.ones(len(rows), dtype=torch.bool)
            for row, pattern in flips.items():
                correct[row] = pattern[epoch]
            on_epoch(epoch, rows, correct)
        return [0.0] * 4

    monkeypatch.setattr(coreset, "train", fake_train)
    images, _ = build("forgetting", SETTINGS["forgetting"], 2, context(toy_store)).run()
    x = torch.from_numpy(toy_store.patches(np.array([0, 4, 7]))).float() / 255
    torch.testing.assert_close(images[0], x[0])  # class 0: row 0 (two events) first
    torch.testing.assert_close(images[1], x[1])  # then row 4 (one event)
    torch.testing.assert_close(images[2], x[2])  # class 1 (odd rows): row 7


def test_checkpoint_key_covers_store_pool_and_template_contents(tmp_path):
    path = make_toy_store(tmp_path / "p.zarr")  # 8 patches per chunk
    pool_file, template = tmp_path / "pool.pt", tmp_path / "template.json"
    pool_file.write_bytes(b"pool 1")
    template.write_bytes(b"template 1")
    keys = [fingerprint(PatchStore(path), pool_file, template)]
    assert fingerprint(PatchStore(path), pool_file, template) == keys[0]  # stable
    pool_file.write_bytes(b"pool 2")
    keys.append(fingerprint(PatchStore(path), pool_file, template))
    template.write_bytes(b"template 2")
    keys.append(fingerprint(PatchStore(path), pool_file, template))
    group = zarr.open_group(str(path), mode="a")
    attrs = dict(group.attrs)
    label = group["label"][:]
    label[[0, 1]] = label[[1, 0]]  # same class counts, attributes and channel statistics
    group["label"][:] = label
    keys.append(fingerprint(PatchStore(path), pool_file, template))
    a, b = group["patches"][0], group["patches"][16]  # one class, two chunks: same statistics
    group["patches"][0], group["patches"][16] = b, a
    keys.append(fingerprint(PatchStore(path), pool_file, template))
    assert dict(group.attrs) == attrs and len(set(keys)) == len(keys)


@pytest.mark.slow
def test_relabelled_store_gives_a_fresh_run_not_a_resume(tmp_path):
    path = make_toy_store(tmp_path / "p.zarr")
    ckpt = tmp_path / "h.ckpt"

    def ctx(checkpoint=None) -> Context:
        store = PatchStore(path)
        real = RealData(store, "train", 64, 0, torch.device("cpu"))
        return Context(real, 0, None, checkpoint, pool(), progress=False,
                       fingerprint=fingerprint(store))

    build("histodd", SETTINGS["histodd"], 2, ctx(ckpt)).run(stop_after=2)
    group = zarr.open_group(str(path), mode="a")
    label = group["label"][:]
    label[[0, 1, 2, 3]] = label[[1, 0, 3, 2]]
    group["label"][:] = label
    fresh, _ = build("histodd", SETTINGS["histodd"], 2, ctx()).run()
    resumed, _ = build("histodd", SETTINGS["histodd"], 2, ctx(ckpt)).run()
    torch.testing.assert_close(resumed, fresh, rtol=0, atol=1e-6)


def test_the_pool_trains_under_distillations_augmentation_with_the_stain_template(toy_store, tmp_path,
                                                                                  monkeypatch):
    """Histo-DD matches gradients of stain-normalised inputs, so its pool networks are trained on
    them too: the pool trainer gets the template and augments with it."""
    from histodistill.distill import run
    from histodistill.stain import StainTemplate

    template = StainTemplate([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], [1.0, 0.5])
    template.save(tmp_path / "t.json")
    seen = []
    real_augment = run.Augment

    def spy(cfg, tmpl, *args):
        seen.append((list(cfg.ops), tmpl))
        return real_augment(cfg, tmpl, *args)

    monkeypatch.setattr(run, "Augment", spy)
    cfg = {"net": "convnet", "net_kwargs": NET, "size": 1, "save_epochs": [1],
           "train": {**TRAIN, "epochs": 1, "batch": 16, "schedule": "constant"},
           "augment": {**AUGMENT, "preset": "all"}}
    run.pretrain_pool(toy_store.path, tmp_path / "t.json", tmp_path / "pool.pt", cfg=cfg, seed=0,
                      cache_mb=64)
    assert seen and "stain" in seen[0][0]
    assert seen[0][1] is not None and seen[0][1].stain_matrix == template.stain_matrix
    with pytest.raises(ValueError, match="stain template"):
        run.pretrain_pool(toy_store.path, None, tmp_path / "pool2.pt", cfg=cfg, seed=0, cache_mb=64)


@pytest.mark.slow
def test_the_cost_of_a_run_counts_image_updates_and_seconds_through_a_resume(toy_store, tmp_path):
    """The budget figures of a comparison: DM takes one image step per iteration, Histo-DD one
    per class per inner step; an interrupted run's resume carries both counts on."""
    dm = build("dm", SETTINGS["dm"], 2, context(toy_store))
    dm.run()
    assert dm.image_updates == SETTINGS["dm"]["iterations"] and dm.seconds > 0
    h = SETTINGS["histodd"]
    histodd = build("histodd", h, 2, context(toy_store))
    histodd.run()
    assert histodd.image_updates == h["outer_loop"] * h["inner_loop"] * 2
    ckpt = tmp_path / "dm.ckpt"
    first = build("dm", SETTINGS["dm"], 2, context(toy_store, ckpt))
    first.run(stop_after=2)
    resumed = build("dm", SETTINGS["dm"], 2, context(toy_store, ckpt))
    resumed.run()
    assert resumed.image_updates == SETTINGS["dm"]["iterations"]
    assert resumed.seconds > first.seconds > 0
