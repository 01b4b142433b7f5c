"""Trajectory matching: the expert buffer (store round trip, resume per expert), the student's
checkpointed unroll, MTT and PTM (matching loss, schedule, retraining, overlap MMD, resume)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import AUGMENT, TRAIN, make_toy_store, method_settings
from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import RealData
from histodistill.data.store import PatchStore
from histodistill.distill import Context, build
from histodistill.distill.mtt import matching_loss
from histodistill.distill.ptm import (complement_mask, end_point, median_sigma, overlap_mmd,
                                      retrain_iterations, retrain_points)
from histodistill.io import InputError
from histodistill.trajectories import buffer
from histodistill.trajectories.store import ExpertStore
from histodistill.trajectories.unroll import Plan, Student, plain_unroll, unroll

NET = {"width": 8}  # ConvNet with instance norm, as the experts of MTT
BUFFER = {"experts": 3, "epochs": 3, "net": "convnet", "net_kwargs": NET,
          "train": {**TRAIN, "lr": 0.01, "momentum": 0, "weight_decay": 0, "batch": 16,
                    "schedule": "constant"},
          "augment": {**AUGMENT, "preset": "dsa"}, "dtype": "float32"}
MTT = method_settings("mtt", iterations=4, syn_steps=5, expert_epochs=2, max_start_epoch=2, lr_img=1000,
                      lr_lr=1e-5, lr_teacher=0.01, augment={**AUGMENT, "preset": "dsa"},
                      checkpoint_every=1)
PTM = method_settings("ptm", iterations=9, syn_steps=2, end_epoch=3, lr_img=1000, lr_lr=1e-5,
                      lr_teacher=0.01, augment={**AUGMENT, "preset": "dsa"}, retrain=2, beta_match=1.0,
                      beta_overlap=0.01, sigma=1.0, match_points="end", start_window=0,
                      checkpoint_every=1)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "p.zarr")


@pytest.fixture(scope="module")
def experts(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "convnet.h5"
    buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
    return out


def context(store_path, experts, checkpoint=None) -> Context:
    real = RealData(PatchStore(store_path), "train", 64, 0, torch.device("cpu"))
    return Context(real, 0, None, checkpoint, {}, False, "", experts=experts)


# ---- the student's unroll ------------------------------------------------------------------
def toy_problem(seed: int = 0, steps: int = 7):
    torch.manual_seed(seed)
    net = models.build("convnet", 2, 16, **NET)
    student = Student(net)
    images = torch.randn(6, 3, 16, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    aug = Augment(AugmentConfig.from_config({**AUGMENT, "preset": "dsa"}))
    plan = Plan.draw(6, steps, 4, aug, torch.Generator().manual_seed(seed))
    return student, student.flat(), images, labels, aug, plan


@pytest.mark.slow
@pytest.mark.parametrize("segment", [1, 3, 7])
def test_checkpointed_unroll_gives_the_plain_unrolls_end_point_and_gradients(segment):
    student, theta0, images, labels, aug, plan = toy_problem()
    target = theta0 + 0.01 * torch.randn_like(theta0)
    grads = []
    for run in (lambda lr: plain_unroll(student, theta0, images, labels, lr, plan, aug),
                lambda lr: unroll(student, theta0, images, labels, lr, plan, aug, segment)):
        images.grad = None
        lr = torch.tensor(0.01, requires_grad=True)
        end = run(lr)
        matching_loss(end, theta0, target).backward()
        grads.append((end.detach(), images.grad.clone(), lr.grad.clone()))
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-9)
    assert grads[0][1].abs().sum() > 0 and grads[0][2].abs() > 0  # the gradients are not trivial


def test_student_steps_are_sgd_on_the_synthetic_batches():
    """One unrolled step equals a network trained one SGD step by torch.optim on the same batch."""
    student, theta0, images, labels, _, _ = toy_problem()
    plan = Plan.draw(6, 1, None, None, torch.Generator().manual_seed(1))
    end = unroll(student, theta0, images, labels, torch.tensor(0.1), plan)
    net = student.net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    idx = plan.batches[0]
    torch.nn.functional.cross_entropy(net(images.detach()[idx]), labels[idx]).backward()
    opt.step()
    torch.testing.assert_close(end, Student(net).flat(), rtol=1e-5, atol=1e-7)


def test_matching_loss_is_zero_when_the_student_follows_the_expert():
    """An 'expert' trained by the same steps the student takes: the loss is exactly zero; a
    student at another learning rate is not."""
    student, theta0, images, labels, aug, plan = toy_problem()
    with torch.no_grad():
        expert_end = unroll(student, theta0, images, labels, torch.tensor(0.02), plan, aug)
    end = unroll(student, theta0, images, labels, torch.tensor(0.02), plan, aug, 3)
    assert matching_loss(end, theta0, expert_end).item() == 0
    other = unroll(student, theta0, images, labels, torch.tensor(0.03), plan, aug, 3)
    assert matching_loss(other, theta0, expert_end).item() > 1e-4


def test_networks_with_buffers_are_refused():
    with pytest.raises(ValueError, match="without buffers"):
        Student(models.build("convnet", 2, 16, width=8, norm="batchnorm"))


# ---- the expert buffer ---------------------------------------------------------------------
@pytest.mark.slow
def test_buffered_trajectory_loads_into_a_network_bit_exactly(store_path, experts):
    es = ExpertStore(experts)
    assert (es.experts, es.epochs) == (3, 3)
    assert es.data.chunks == (1, 1, es.num_params)  # one (expert, epoch) row per chunk: lazy reads
    assert es.attrs["settings"]["train"]["momentum"] == 0 and es.attrs["net_kwargs"] == NET
    inputs = buffer.Inputs(PatchStore(store_path), None, False, torch.device("cpu"), 64)
    again = buffer.train_expert(BUFFER, inputs, 0, 1, progress=False)  # deterministic retraining
    for epoch in range(4):
        net = es.load_into(es.build_net(), 1, epoch)
        loaded = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
        assert torch.equal(loaded, torch.from_numpy(again[epoch]))
    assert not np.array_equal(again[0], again[3])  # the expert did train
    init = buffer.new_expert(BUFFER, inputs, buffer.expert_seed(0, 1))  # epoch 0 is its init
    assert torch.equal(Student(init).flat(), torch.from_numpy(again[0]))
    assert not torch.equal(es.params(0, 0), es.params(1, 0))  # experts start apart


def test_float16_store_holds_the_rounded_trajectory(store_path, experts, tmp_path):
    out = tmp_path / "half.h5"
    buffer.buffer_experts(store_path, out, {**BUFFER, "experts": 1, "dtype": "float16"}, seed=0,
                          cache_mb=64, progress=False)
    with h5py.File(out) as f:
        assert f["params"].dtype == np.float16
    full = ExpertStore(experts).params(0, 2)
    assert torch.equal(ExpertStore(out).params(0, 2), full.half().float())


@pytest.mark.slow
def test_interrupted_buffer_resumes_expert_by_expert(store_path, experts, tmp_path, monkeypatch):
    out = tmp_path / "convnet.h5"
    trained, crashes = [], [2]
    real_train = buffer.train_expert

    def crash_at_third(cfg, inputs, seed, expert, progress=True):
        if expert in crashes:
            crashes.remove(expert)
            trained.append("crashed")
            raise RuntimeError("job lost")
        trained.append(expert)
        return real_train(cfg, inputs, seed, expert, progress)

    monkeypatch.setattr(buffer, "train_expert", crash_at_third)
    with pytest.raises(RuntimeError, match="job lost"):
        buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "convnet.h5.partial").glob("*.npy")) == [
        "expert_0000.npy", "expert_0001.npy"]
    buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
    assert trained == [0, 1, "crashed", 2]  # the rerun trained only the unfinished expert
    assert not (tmp_path / "convnet.h5.partial").exists()
    with h5py.File(out) as a, h5py.File(experts) as b:
        assert np.array_equal(a["params"][:], b["params"][:])  # as an uninterrupted run
    # a run asked for more experts than an interrupted one reuses the ones it finished
    crashes.append(1)
    trained.clear()
    with pytest.raises(RuntimeError, match="job lost"):
        buffer.buffer_experts(store_path, out, {**BUFFER, "experts": 2}, seed=0, cache_mb=64,
                              progress=False)
    buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
    assert trained == [0, "crashed", 1, 2]
    with h5py.File(out) as a, h5py.File(experts) as b:
        assert np.array_equal(a["params"][:], b["params"][:])
        assert a.attrs["key"] == b.attrs["key"]  # the store's key (a distillation's) counts them
    buffer.buffer_experts(store_path, out, {**BUFFER, "experts": 2}, seed=0, cache_mb=64, progress=False)
    with h5py.File(out) as a, h5py.File(experts) as b:
        assert a.attrs["key"] != b.attrs["key"]
    # experts of other settings, unsealed (a kill while writing) or damaged are not reused
    crashes.append(2)
    trained.clear()
    with pytest.raises(RuntimeError, match="job lost"):
        buffer.buffer_experts(store_path, out, {**BUFFER, "train": {**BUFFER["train"], "lr": 0.02}}, seed=0,
                              cache_mb=64, progress=False)
    assert trained == [0, 1, "crashed"]
    trained.clear()
    buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
    assert trained == [0, 1, 2]  # other settings: nothing reused
    partial = tmp_path / "convnet.h5.partial"
    for damage in ("truncate", "unsealed", "bad seal"):
        crashes.append(2)
        with pytest.raises(RuntimeError, match="job lost"):
            buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
        npy = partial / "expert_0001.npy"
        if damage == "truncate":
            npy.write_bytes(npy.read_bytes()[:-40])
        elif damage == "unsealed":
            (partial / "expert_0001.npy.sealed").unlink()
        else:
            (partial / "expert_0001.npy.sealed").write_text("{")
        trained.clear()
        buffer.buffer_experts(store_path, out, BUFFER, seed=0, cache_mb=64, progress=False)
        assert trained == [1, 2], damage  # the damaged expert redone, the intact one kept
        with h5py.File(out) as a, h5py.File(experts) as b:
            assert np.array_equal(a["params"][:], b["params"][:])


def test_a_file_that_is_not_a_store_gets_one_message(tmp_path):
    bad = tmp_path / "convnet.h5"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="not an expert-trajectory store"):
        ExpertStore(bad)


# ---- MTT -----------------------------------------------------------------------------------
def test_mtt_gradient_reaches_the_images_and_the_learning_rate(store_path, experts):
    d = build("mtt", MTT, 2, context(store_path, experts))
    d.init_state()
    images, lr = d.images.detach().clone(), d.syn_lr.item()
    d.step(0)
    assert d.images.grad.abs().sum() > 0 and d.syn_lr.grad.abs() > 0
    assert not torch.equal(d.images.detach(), images) and d.syn_lr.item() != lr
    lo, hi = d.ctx.stats.bounds(d.images)  # clamped to the valid pixel range
    assert (d.images >= lo - 1e-6).all() and (d.images <= hi + 1e-6).all()


@pytest.mark.slow
def test_mtt_draws_segments_within_the_configured_epochs(store_path, experts, monkeypatch):
    d = build("mtt", {**MTT, "max_start_epoch": 2, "expert_epochs": 1}, 2,
              context(store_path, experts))
    d.init_state()
    seen = []
    monkeypatch.setattr(d, "expert_point", lambda e, t: seen.append((e, t)) or d.experts.params(e, t))
    for it in range(12):
        d.step(it)
    starts = {e_t[1] for e_t in seen[0::2]}
    assert starts == {0, 1} and all(t1 - t0 == 1 for (_, t0), (_, t1) in zip(seen[0::2], seen[1::2]))
    assert {e for e, _ in seen} == {0, 1, 2}


def test_segments_beyond_the_store_are_refused(store_path, experts):
    with pytest.raises(ValueError, match="max_start_epoch 3 and expert_epochs 2 reach epoch 4"):
        build("mtt", {**MTT, "max_start_epoch": 3}, 2, context(store_path, experts)).init_state()
    with pytest.raises(ValueError, match="end_epoch 4 must lie in 1..3"):
        build("ptm", {**PTM, "end_epoch": 4}, 2, context(store_path, experts)).init_state()


@pytest.mark.slow
@pytest.mark.parametrize("method,stop", [("mtt", 2), ("ptm", 3), ("ptm", 6)])
def test_resume_mid_run_gives_the_images_of_an_uninterrupted_run(store_path, experts, tmp_path,
                                                                method, stop):
    """PTM (9 iterations, k 2: snapshots at iterations 2 and 5, resets at 3 and 6) stops between
    a snapshot and its reset: the snapshot must survive the checkpoint."""
    cfg = MTT if method == "mtt" else PTM
    whole = build(method, cfg, 2, context(store_path, experts))
    images, _ = whole.run()
    ckpt = tmp_path / "run.ckpt"
    first = build(method, cfg, 2, context(store_path, experts, ckpt))
    first.run(stop_after=stop)
    assert ckpt.exists()
    second = build(method, cfg, 2, context(store_path, experts, ckpt))
    resumed, _ = second.run()
    assert torch.equal(resumed, images)
    assert second.syn_lr.item() == whole.syn_lr.item()
    assert not torch.equal(images, build("random", {}, 2, context(store_path, experts)).run()[0])


# ---- PTM -----------------------------------------------------------------------------------
@pytest.mark.parametrize("iterations,end", [(10, 10), (100, 7), (7, 3)])
def test_schedule_yields_end_points_1_to_T_in_order(iterations, end):
    points = [end_point(it, iterations, end) for it in range(iterations)]
    assert points[0] == 1 and points[-1] == end
    assert all(b - a in (0, 1) for a, b in zip(points, points[1:]))  # in order, none skipped
    assert sorted(set(points)) == list(range(1, end + 1))


def ptm_rounds(d, monkeypatch) -> tuple[list[int], list[int]]:
    """Run every iteration of PTM ``d``: the expert epochs it read (start and end point of each
    round, in turn) and the student steps of each round."""
    seen, steps = [], []
    monkeypatch.setattr(d, "expert_point", lambda e, t: seen.append(t) or d.experts.params(e, t))
    real_end = d.student_end
    monkeypatch.setattr(d, "student_end", lambda s, n: steps.append(n) or real_end(s, n))
    for it in range(PTM["iterations"]):
        d.step(it)
    return seen, steps


@pytest.mark.slow
def test_ptm_always_starts_from_theta0_and_follows_the_schedule(store_path, experts, monkeypatch):
    d = build("ptm", PTM, 2, context(store_path, experts))
    d.init_state()
    seen, steps = ptm_rounds(d, monkeypatch)
    assert seen[0::2] == [0] * 9  # every round starts at theta_0
    assert seen[1::2] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert steps == [2 * t for t in seen[1::2]]  # syn_steps per expert epoch


def test_a_later_start_epoch_unrolls_only_the_rest_of_the_way(store_path, experts, monkeypatch):
    """start_window (the ptm_ablation study's window variants): with 1 the student starts one
    epoch before the end point; with 2, two, but never before theta_0."""
    d = build("ptm", {**PTM, "start_window": 1}, 2, context(store_path, experts))
    d.init_state()
    seen, steps = ptm_rounds(d, monkeypatch)
    assert seen[0::2] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and seen[1::2] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert steps == [2] * 9
    assert [build("ptm", {**PTM, "start_window": 2}, 2, context(store_path, experts)).start_epoch(t)
            for t in (1, 2, 3)] == [0, 0, 1]


def test_retraining_points_and_their_iterations():
    assert retrain_points(10, 1) == [5.0]
    assert retrain_points(12, 3) == [9.0, 6.0, 3.0]
    for iterations, k, end in [(30, 2, 10), (100, 3, 12), (7, 2, 5), (1000, 1, 50)]:
        events = retrain_iterations(iterations, k)
        m = retrain_points(end, k) + [0.0]
        for i, (snapshot, reset) in enumerate(events):
            progress = lambda it: it * end / iterations  # noqa: E731
            # reset: the first iteration at or past m_i; snapshot: at or past the interval's middle
            assert progress(reset) >= m[i] - 1e-9 > progress(reset - 1)
            middle = (m[i] + m[i + 1]) / 2
            assert progress(snapshot) >= middle - 1e-9 > progress(snapshot - 1)
            assert snapshot < reset


def test_ptm_has_no_image_loss_under_the_expert(store_path, experts):
    """L_c is the student's own cross-entropy (inside the unroll), not a loss of the images: with
    the matching and overlap weights at 0 the images stay put whatever else is set."""
    d = build("ptm", {**PTM, "beta_match": 0.0, "beta_overlap": 0.0}, 2,
              context(store_path, experts))
    d.init_state()
    images = d.images.detach().clone()
    assert d.step(0) == 0.0 and torch.equal(d.images.detach(), images)
    d = build("ptm", {**PTM, "beta_overlap": 0.0}, 2, context(store_path, experts))
    d.init_state()
    assert d.step(0) > 0 and not torch.equal(d.images.detach(), images)


def test_the_students_loss_is_plain_cross_entropy_on_the_synthetic_batch():
    """One unrolled step equals one SGD step on F.cross_entropy of the synthetic batch."""
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, **NET)
    student = Student(net)
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 0, 1, 1])
    theta = student.flat()
    plan = Plan.draw(4, 1, None, None, torch.Generator().manual_seed(0))
    end = unroll(student, theta, images, labels, torch.tensor(0.1), plan)
    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(student(t, images), labels), t)
    assert torch.allclose(end, theta - 0.1 * grad, atol=1e-6)


def test_non_forgetful_matching_compares_every_epoch_boundary(store_path, experts, monkeypatch):
    """match_points all: the student passes epochs 1..t from theta_0, each compared with the
    expert there; the loss is their mean."""
    d = build("ptm", {**PTM, "match_points": "all"}, 2, context(store_path, experts))
    d.init_state()
    seen, steps = [], []
    monkeypatch.setattr(d, "expert_point", lambda e, t: seen.append(t) or d.experts.params(e, t))
    real_end = d.student_end
    monkeypatch.setattr(d, "student_end", lambda s, n: steps.append(n) or real_end(s, n))
    loss = d.match(0, 0, 3)
    assert seen == [0, 1, 2, 3] and steps == [2, 2, 2]
    assert loss.item() > 0 and torch.isfinite(loss)
    end_only = build("ptm", PTM, 2, context(store_path, experts))
    end_only.init_state()
    seen.clear()
    monkeypatch.setattr(end_only, "expert_point",
                        lambda e, t: seen.append(t) or end_only.experts.params(e, t))
    end_only.match(0, 0, 3)
    assert seen == [0, 3]


def test_retraining_resets_exactly_the_complement_exactly_at_m_i(store_path, experts):
    d = build("ptm", {**PTM, "iterations": 30, "retrain": 2}, 4, context(store_path, experts))
    d.init_state()
    sc = complement_mask(2, 4)
    assert sc.tolist() == [False, False, True, True] * 2
    events = dict((reset, snap) for snap, reset in d.events)  # reset it -> snapshot it
    assert events == {10: 5, 20: 15}
    d.opt.state[d.images] = {"momentum_buffer": torch.ones_like(d.images)}
    history = {}
    for it in range(30):
        with torch.no_grad():
            d.images.copy_(torch.full_like(d.images, float(it)))  # the images as training left them
        before = d.images.detach().clone()
        d.retrain(it)
        history[it] = before
        after = d.images.detach()
        assert torch.equal(after[~sc], before[~sc])  # S^f is never touched
        momentum = d.opt.state[d.images]["momentum_buffer"]
        if it in events:
            assert torch.equal(after[sc], history[events[it]][sc])  # S^c back to its snapshot
            assert (momentum[sc] == 0).all() and (momentum[~sc] == 1).all()
            momentum.fill_(1)
        else:
            assert torch.equal(after[sc], before[sc])


def test_overlap_mmd_is_zero_for_identical_subsets_and_positive_otherwise():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    sc = complement_mask(2, 4)
    x = torch.randn(8, 3, 8, 8)
    same = x.clone()
    same[sc] = x[~sc]  # each class's complement equals its foundation
    assert overlap_mmd(same, labels, sc, 1.0).item() == 0
    swapped = same.clone()
    swapped[sc] = same[~sc].flip(0).roll(2, 0)  # same sets, other order within each class
    assert overlap_mmd(swapped, labels, sc, 1.0).item() == pytest.approx(0, abs=1e-6)
    assert overlap_mmd(x, labels, sc, 1.0).item() > 0
    near = same.clone()
    near[sc] += 0.05 * torch.randn_like(near[sc])
    assert 0 < overlap_mmd(near, labels, sc, 1.0).item() < overlap_mmd(x, labels, sc, 1.0).item()
    # only same-class pairs count: class 1's complement equal to class 0's foundation is no overlap
    cross = x.clone()
    cross[4:][sc[4:]] = x[:4][~sc[:4]]
    assert overlap_mmd(cross, labels, sc, 1.0) > 0
    # equal halves: the paper's double sum (with the sign that makes the overlap loss -MMD^2)
    # over its 2 x 2 pairs
    f, c = x[:4][~sc[:4]].flatten(1), x[:4][sc[:4]].flatten(1)
    k = lambda a, b: torch.exp(-((a - b) ** 2).mean() / 2)  # noqa: E731
    paper = sum(2 * k(f[i], c[j]) - k(c[i], c[j]) - k(f[i], f[j]) for i in range(2) for j in range(2))
    assert overlap_mmd(x[:4], labels[:4], sc[:4], 1.0).item() == pytest.approx(-paper.item() / 4,
                                                                               rel=1e-5)


@pytest.mark.parametrize("sigma", [1.0, "median"])
def test_the_overlap_terms_weight_does_not_depend_on_ipc(sigma):
    """The same images at ipc 2 (one foundation and one complement image per class) and ipc 10
    (each of them five times): the term's value is the same, and so is the gradient each image
    gets in total over its copies, as L_match's does (a mean over the batch). Eq. 4's sum over
    pairs grew 25-fold."""
    torch.manual_seed(0)
    base = torch.randn(4, 3, 8, 8)  # class 0: f, c; class 1: f, c
    grads, values = {}, {}
    for ipc in (2, 10):
        copies = ipc // 2
        x = torch.cat([base[i:i + 1].repeat(copies, 1, 1, 1) for i in range(4)]).requires_grad_(True)
        labels = torch.arange(2).repeat_interleave(ipc)
        value = -overlap_mmd(x, labels, complement_mask(2, ipc), sigma, within_grad=False)
        value.backward()
        values[ipc] = value.item()
        grads[ipc] = x.grad.view(4, copies, -1).sum(1)  # total per distinct image
    assert values[10] == pytest.approx(values[2], rel=1e-5)
    assert torch.allclose(grads[10], grads[2], rtol=1e-4, atol=1e-8)
    assert grads[2].abs().sum() > 0


def test_median_sigma_sets_the_kernel_at_the_images_own_distances():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    assert median_sigma(x) ** 2 * 2 == pytest.approx(2.0, rel=0.1)  # unit normal: d = 2 per value
    assert median_sigma(x * 10) == pytest.approx(10 * median_sigma(x), rel=1e-5)
    assert median_sigma(x[:1]) == 1.0


def _spread(x: torch.Tensor, rows: torch.Tensor) -> float:
    z = x[rows].flatten(1)
    return float(((z[:, None] - z[None]) ** 2).mean(-1).sum() / (len(z) * (len(z) - 1)))


def test_the_overlap_loss_spreads_the_images_where_the_full_mmd_gradient_collapses_them():
    """Maximising the whole MMD^2 also maximises the within-subset kernel terms, which pulls
    each half into one image; PTM's loss keeps their value but not their gradient, so it only
    pushes S^c away from S^f and each half spreads out."""
    torch.manual_seed(0)
    labels = torch.zeros(10, dtype=torch.long)
    sc = complement_mask(1, 10)
    start = torch.randn(10, 3, 8, 8)
    spreads = {}
    for within_grad in (True, False):
        x = start.clone().requires_grad_(True)
        opt = torch.optim.SGD([x], lr=125.0)  # 5 x 5 pairs, averaged
        for _ in range(200):
            opt.zero_grad()
            loss = -overlap_mmd(x, labels, sc, 1.0, within_grad=within_grad)
            loss.backward()
            opt.step()
        assert overlap_mmd(x.detach(), labels, sc, 1.0) > overlap_mmd(start, labels, sc, 1.0)
        spreads[within_grad] = [_spread(x.detach(), rows) for rows in (~sc, sc)]
    before = [_spread(start, rows) for rows in (~sc, sc)]
    assert all(s < 0.01 * b for s, b in zip(spreads[True], before))  # collapsed halves
    assert all(s > b for s, b in zip(spreads[False], before))  # more diverse halves
    x = start.clone().requires_grad_(True)
    assert overlap_mmd(x, labels, sc, 1.0, within_grad=False).item() == pytest.approx(
        overlap_mmd(start, labels, sc, 1.0).item())  # same value


def test_minimising_the_overlap_term_pushes_the_complement_away():
    torch.manual_seed(1)
    labels = torch.tensor([0, 0, 0, 0])
    sc = complement_mask(1, 4)
    x = torch.randn(4, 3, 8, 8)
    x[sc] = x[~sc] + 0.1 * torch.randn(2, 3, 8, 8)
    x.requires_grad_(True)
    before = overlap_mmd(x, labels, sc, 1.0)
    (-before).backward()
    with torch.no_grad():
        moved = x - 0.5 * x.grad
    assert overlap_mmd(moved, labels, sc, 1.0) > before
