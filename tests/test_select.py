"""Selection from a pool: InfoDist's graph, communities, budget split and ranking; HistoDiffusion's
centroid ranking; the select rule's output and its errors; the augmentation study's batches."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import ENCODER, TRAIN, make_toy_store
from histodistill import config
from histodistill.data.store import PatchStore
from histodistill.encoders import load_encoder, train_encoder
from histodistill.training import Inputs
from histodistill.io import InputError
from histodistill.select.run import Candidates, Context, build
from histodistill.select.centroid import class_centroids, normalised, ranking
from histodistill.select.graph import softmax_graph
from histodistill.select.infodist import Communities, allocate, communities, pick
from histodistill.select.run import select
from histodistill.select.study import mixed_batches, real_subset

INFODIST = {**config.defaults("select.methods.infodist"), "selector": "infodist", "embedding": "encoder",
            "graph": "softmax", "eta": 0.004, "rank": "modular_centrality", "trials": 2}


# ---- budget split -------------------------------------------------------------------------------
def test_allocate_is_proportional_with_largest_remainders() -> None:
    # quotas 2.5, 1.5, 1.0: floors 2, 1, 1; the one left goes to the larger of the tied remainders
    assert allocate(np.array([5, 3, 2]), 5).tolist() == [3, 1, 1]
    # quotas 7.2, 0.9, 0.9: the two largest remainders are the small communities'
    assert allocate(np.array([8, 1, 1]), 9).tolist() == [7, 1, 1]
    assert allocate(np.array([1] * 10), 3).tolist() == [1, 1, 1] + [0] * 7  # more communities than budget
    assert allocate(np.array([4, 6]), 10).tolist() == [4, 6]
    assert allocate(np.array([4, 6]), 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="cannot select 11 of 10"):
        allocate(np.array([4, 6]), 11)


def test_allocate_meets_every_budget_within_floor_and_ceil_of_the_quota() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 30, rng.integers(1, 12))
        for budget in range(int(sizes.sum()) + 1):
            share = allocate(sizes, budget)
            quota = budget * sizes / sizes.sum()
            assert share.sum() == budget and (share <= sizes).all()
            assert (share >= np.floor(quota) - 1e-9).all() and (share <= np.ceil(quota) + 1e-9).all()


def test_pick_takes_the_most_central_nodes_of_each_community() -> None:
    module = np.array([0, 0, 0, 0, 1, 1, 2])
    centrality = np.array([0.1, 0.4, 0.3, 0.2, 0.05, 0.5, 0.9])
    flow = centrality[::-1].copy()
    comm = Communities(module, {"modular_centrality": centrality, "enter_flow": flow,
                                "exit_flow": flow, "flow": flow}, 1.0)
    # budget 4 over sizes 4, 2, 1: quotas 2.29, 1.14, 0.57 -> 2, 1, 1
    assert pick(comm, 4, "modular_centrality").tolist() == [1, 2, 5, 6]
    assert pick(comm, 4, "enter_flow").tolist() == [0, 1, 5, 6]  # scores .9 .5 .05 .2 | .3 .4 | .1
    assert sorted(pick(comm, 7, "flow").tolist()) == list(range(7))
    with pytest.raises(ValueError, match="unknown InfoDist ranking"):
        pick(comm, 2, "degree")


# ---- graph ----------------------------------------------------------------------------------------
def test_softmax_graph_matches_a_hand_computed_example() -> None:
    x = np.array([[0.0], [1.0], [3.0]])  # distances d01 = 1, d02 = 3, d12 = 2
    g = softmax_graph(x, eta=0.35, relative=False).toarray()
    w01 = math.e / (math.e + math.exp(1 / 3))  # node 0: softmax(1/1, 1/3)
    w10 = math.e / (math.e + math.exp(0.5))  # node 1: softmax(1/1, 1/2)
    w20 = math.exp(1 / 3) / (math.exp(1 / 3) + math.exp(0.5))  # node 2: softmax(1/3, 1/2)
    expected = np.array([[0, w01, 0],  # 0 -> 2 has 1 - w01 = 0.339 < 0.35: dropped
                         [w10, 0, 1 - w10],
                         [w20, 1 - w20, 0]])
    assert np.allclose(g, expected, atol=1e-12)
    assert np.allclose(softmax_graph(x, eta=0.0, relative=False).toarray().sum(1), 1.0)  # rows are a softmax
    assert softmax_graph(x, eta=0.7, relative=False).nnz == 0
    # relative distances: divided by the mean pairwise distance (2), so the logits double
    rel = softmax_graph(x, eta=0.0, relative=True).toarray()
    assert rel[0, 1] == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(2 / 3)))
    assert np.allclose(softmax_graph(7 * x, eta=0.0, relative=True).toarray(), rel)  # scale-free
    # blocks of rows give the same graph as one block
    y = np.random.default_rng(1).normal(size=(50, 4))
    a, b = softmax_graph(y, 0.01, chunk=7, relative=False), softmax_graph(y, 0.01, relative=False)
    assert (a != 0).toarray().tolist() == (b != 0).toarray().tolist()
    assert np.allclose(a.toarray(), b.toarray(), atol=1e-12)


def two_clusters(sizes: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Two clusters 10 apart whose points are all 0.14 from each other (scaled one-hot vectors,
    slightly jittered): inside a cluster the softmax weights are ~1/size, across ~1e-5."""
    n = sum(sizes)
    x = np.concatenate([0.1 * np.eye(n), np.zeros((n, 1))], 1)
    x[sizes[0]:, -1] = 10.0
    return x + np.random.default_rng(seed).normal(0, 1e-3, x.shape)


def test_infomap_finds_two_clear_clusters_and_the_selection_uses_both() -> None:
    x = two_clusters((40, 20))
    comm = communities(softmax_graph(x, 0.004, relative=False), seed=1, trials=2)
    assert len(comm.sizes) == 2 and sorted(comm.sizes.tolist()) == [20, 40]
    assert len(set(comm.module[:40])) == 1 and len(set(comm.module[40:])) == 1
    for budget, split in ((6, (4, 2)), (2, (1, 1)), (5, (3, 2))):  # proportional to 40 : 20
        chosen = pick(comm, budget, "modular_centrality")
        assert len(set(chosen.tolist())) == budget
        assert ((chosen < 40).sum(), (chosen >= 40).sum()) == split
    # same seed, same communities
    again = communities(softmax_graph(x, 0.004, relative=False), seed=1, trials=2)
    assert (again.module == comm.module).all()


# ---- selectors over a store -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("select")
    store = make_toy_store(tmp / "toy.zarr", n_per_class=30, size=16)
    encoder = tmp / "enc.pt"
    train_encoder(store, encoder, {**ENCODER, "kind": "supervised", "net": "convnet", "seed": 0,
                                   "net_kwargs": {"width": 8, "depth": 2, "norm": "batchnorm"},
                                   "train": {**TRAIN, "epochs": 2, "batch": 16, "lr": 0.01}},
                  cache_mb=64)
    return {"store": store, "encoder": encoder, "tmp": tmp}


def context(toy: dict[str, Path], features: np.ndarray | None = None) -> Context:
    store = PatchStore(toy["store"])
    enc = load_encoder(toy["encoder"], torch.device("cpu"))
    pool = Candidates(store, enc, per_class=0, seed=0)
    if features is not None:
        pool._features = features
    return Context(pool, store, enc, seed=0)


@pytest.mark.slow
def test_infodist_selector_splits_each_class_over_its_communities(toy) -> None:
    store = PatchStore(toy["store"])
    labels = store.array("label")[store.indices("train")]
    feats = np.zeros((len(labels), 31))
    for c in (0, 1):  # per class: a cluster of 20 and one of 10, far apart
        idx = np.flatnonzero(labels == c)
        feats[idx] = two_clusters((20, 10), seed=c)
    ctx = context(toy, feats)
    sel = build("infodist", INFODIST, ctx)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        chosen = sel.select(c, 6)
        assert len(set(chosen.tolist())) == 6 and (labels[chosen] == c).all()
        assert np.isin(chosen, idx[:20]).sum() == 4 and np.isin(chosen, idx[20:]).sum() == 2
    with pytest.raises(ValueError, match="needs embedding 'umap'"):
        build("infodist", {**INFODIST, "graph": "knn"}, ctx)


def test_centroid_ranking_filters_by_confidence_and_orders_by_distance() -> None:
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    feats = normalised(np.array([[1.0, 0.1], [1.0, 0.5], [1.0, 0.0], [0.2, 1.0], [1.0, 0.3]]))
    probs = np.array([[0.95, 0.05], [0.92, 0.08], [0.6, 0.4], [0.99, 0.01], [0.91, 0.09]])
    order, passed = ranking(feats, probs, centroids, 0, confidence=0.9, nearest_centroid=True)
    # 2 is closest but not confident, 3 is confident but nearer class 1's centroid
    assert passed == 3 and order.tolist()[:3] == [0, 4, 1]
    assert set(order.tolist()[3:]) == {2, 3} and order.tolist()[3] == 2  # the rest, closest first
    order, passed = ranking(feats, probs, centroids, 0, confidence=0.9, nearest_centroid=False)
    assert passed == 4


def test_centroid_selector_and_centroids_from_the_real_store(toy) -> None:
    ctx = context(toy)
    cent = class_centroids(ctx.encoder, ctx.real)
    assert cent.shape == (2, ctx.encoder.dim)
    assert np.allclose(np.linalg.norm(cent, axis=1) <= 1 + 1e-9, True)  # means of unit vectors
    sel = build("centroid", {**config.defaults("select.methods.centroid"), "selector": "centroid",
                          "confidence": 0.5, "nearest_centroid": True}, ctx)
    chosen = sel.select(1, 5)
    assert len(set(chosen.tolist())) == 5 and (ctx.pool.labels[chosen] == 1).all()
    # the first 5 of the full ranking: the budget takes a prefix of one ranking
    assert chosen.tolist() == sel.select(1, 12)[:5].tolist()


def test_random_selector_is_seeded_and_class_pure(toy) -> None:
    ctx = context(toy)
    a, b = build("random", {}, ctx).select(0, 7), build("random", {}, ctx).select(0, 7)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 7
    assert (ctx.pool.labels[a] == 0).all()


def test_select_writes_a_distilled_set_and_refuses_too_small_pools(toy) -> None:
    tmp = toy["tmp"]
    rows = select("infodist_real", INFODIST, 4, seed=0, pool_path=toy["store"], store_path=toy["store"],
                  encoder_path=toy["encoder"], out_zarr=tmp / "s.zarr", out_png=tmp / "s.png",
                  out_json=tmp / "s.json")
    group = zarr.open_group(str(tmp / "s.zarr"), mode="r")
    store = PatchStore(toy["store"])
    assert group["labels"][:].tolist() == [0] * 4 + [1] * 4
    assert (store.array("label")[rows] == group["labels"][:]).all()
    assert (group["images"][:] == store.patches(np.sort(rows))[np.argsort(np.argsort(rows))]).all()
    assert group.attrs["method"] == "infodist_real" and group.attrs["patch_size"] == 16
    assert (tmp / "s.png").stat().st_size > 0 and (tmp / "s.json").exists()
    with pytest.raises(InputError, match="has 30 candidates, fewer than the 31"):
        select("infodist_real", INFODIST, 31, seed=0, pool_path=toy["store"], store_path=toy["store"],
               encoder_path=toy["encoder"], out_zarr=tmp / "t.zarr", out_png=tmp / "t.png",
               out_json=tmp / "t.json")
    assert not (tmp / "t.zarr").exists()


def test_select_refuses_a_pool_of_other_classes(toy) -> None:
    tmp = toy["tmp"]
    other = make_toy_store(tmp / "other.zarr", n_per_class=10, size=16)
    zarr.open_group(str(other), mode="a").attrs["class_names"] = ["a", "b"]
    with pytest.raises(InputError, match=r"\[select\].*classes \['a', 'b'\] differ"):
        select("synrandom", {**config.defaults("select.methods.synrandom"), "selector": "random"}, 2,
               seed=0, pool_path=other, store_path=toy["store"], encoder_path=None,
               out_zarr=tmp / "u.zarr", out_png=tmp / "u.png", out_json=tmp / "u.json")


def test_study_subset_is_balanced_and_mixed_batches_cover_both_sources_once(toy) -> None:
    store = PatchStore(toy["store"])
    subset, k = real_subset(store, 0.2, seed=0)
    labels = store.array("label")
    assert k == 6 and np.bincount(labels[subset]).tolist() == [6, 6]
    with pytest.raises(InputError, match="has 30 training patches, fewer than the 60"):
        real_subset(store, 2.0, seed=0)
    other = np.setdiff1d(store.indices("train"), subset)[:18]
    inputs = Inputs(store, None, False, torch.device("cpu"))
    batches = mixed_batches(inputs, [(store, subset), (store, other)], 10, 0, 16)
    seen = [len(y) for _, y, _ in batches(0)]
    assert sum(seen) == len(subset) + len(other) and max(seen) <= 10
    x, y, _ = next(iter(batches(0)))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 3  # normalised network inputs


@pytest.mark.slow
def test_umap_embedding_and_knn_graph_path(toy) -> None:
    """UMAP to a few dimensions and its kNN graph (InfoDist's other graph); one process-wide
    numba compilation (~20 s), so one test."""
    from histodistill.select.graph import umap_embedding

    store = PatchStore(toy["store"])
    labels = store.array("label")[store.indices("train")]
    feats = np.zeros((len(labels), 31))
    for c in (0, 1):
        feats[labels == c] = two_clusters((20, 10), seed=c)
    emb, knn = umap_embedding(feats[labels == 0], {"n_components": 3, "n_neighbors": 5,
                                                   "min_dist": 0.05, "metric": "euclidean"}, seed=1)
    assert emb.shape == (30, 3) and knn.shape == (30, 30)
    assert np.allclose(knn.toarray(), knn.toarray().T) and knn.max() <= 1 + 1e-6
    # the kNN graph links a cluster's points among themselves, never across
    dense = knn.toarray()
    assert dense[:20, 20:].sum() == 0 and dense[:20, :20].sum() > 0
    cfg = {**INFODIST, "embedding": "umap", "graph": "knn",
           "umap": {"input": "encoder", "n_components": 3, "n_neighbors": 5, "min_dist": 0.05,
                    "metric": "euclidean"}}
    chosen = build("infodist", cfg, context(toy, feats)).select(0, 6)
    idx = np.flatnonzero(labels == 0)
    assert len(set(chosen.tolist())) == 6 and np.isin(chosen, idx[20:]).sum() >= 1
