"""InfoDist's selection (Li & Kainz, MICCAI 2024; ZheLi2020/InfoDist ``cluster_infomap.py``): per
class, Infomap communities of a graph over the candidates' embeddings, the class budget split
over the communities, and within each community the most central nodes.

* Infomap (Rosvall & Bergstrom 2008; the ``infomap`` package): two-level, directed, seeded, the
  best of ``trials`` runs. Communities come in Infomap's order (descending flow).
* Budget: proportional to community size, rounded by largest remainders (ties: the larger, then
  the earlier community). Each share is at most the community's size, so the budget is met
  exactly however many or few communities there are. InfoDist's code splits the budget evenly
  over communities and tops up from the first; the proportional split is this project's spec.
* Ranking inside a community: ``modular_centrality`` (InfoDist's default), ``enter_flow``,
  ``exit_flow`` or ``flow``, highest first (ties by node index). InfoDist's code takes the
  first nodes in Infomap's tree order, which is by flow.

A network trained on an InfoDist set adds InfoDist's boundary loss (:mod:`.boundary`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from infomap import Infomap
from scipy import sparse

from histodistill.select.base import Selector, class_seed, register
from histodistill.select.graph import softmax_graph, umap_embedding

log = logging.getLogger(__name__)

RANKS = ("modular_centrality", "enter_flow", "exit_flow", "flow")


@dataclass
class Communities:
    """Infomap's two-level partition of N nodes."""

    module: np.ndarray  # (N,) community index, 0 = the community with the most flow
    scores: dict[str, np.ndarray]  # per ranking in RANKS: (N,) node scores
    codelength: float

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.module, minlength=int(self.module.max()) + 1 if len(self.module) else 0)


def communities(graph: sparse.spmatrix, seed: int, trials: int) -> Communities:
    """Two-level directed Infomap on a weighted sparse graph (row i -> column j), every node
    added even when isolated; links are passed as one array (no Python loop over edges)."""
    n = graph.shape[0]
    im = Infomap(f"--two-level --directed --silent --seed {int(seed)} --num-trials {int(trials)}")
    im.add_nodes(range(n))
    coo = sparse.coo_matrix(graph)
    keep = coo.data > 0
    if keep.any():
        im.add_links(np.column_stack([coo.row[keep], coo.col[keep], coo.data[keep]]).astype(np.float64))
    res = im.run()
    module = np.full(n, -1, np.int64)
    scores = {k: np.zeros(n) for k in RANKS}
    for node in res.tree(states=True):
        if not node.isLeaf():
            continue
        i = node.node_id
        module[i] = node.module_id
        scores["modular_centrality"][i] = node.modular_centrality
        scores["enter_flow"][i] = node.data.enterFlow
        scores["exit_flow"][i] = node.data.exitFlow
        scores["flow"][i] = node.data.flow
    if (module < 0).any():
        raise RuntimeError(f"Infomap returned no module for {(module < 0).sum()} of {n} nodes")
    _, module = np.unique(module, return_inverse=True)  # Infomap's ids (1-based, by flow) -> 0..M-1
    return Communities(module, scores, float(res.codelength))


def allocate(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split ``budget`` over communities of ``sizes`` in proportion to size, by largest remainders
    (exact integer arithmetic); every share is at most its community's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if budget < 0 or budget > total:
        raise ValueError(f"cannot select {budget} of {total} candidates")
    if budget == 0:
        return np.zeros_like(sizes)
    share, remainder = np.divmod(budget * sizes, total)
    left = budget - int(share.sum())
    order = np.lexsort((np.arange(len(sizes)), -sizes, -remainder))  # last key sorts first
    share[order[:left]] += 1
    return share


def pick(comm: Communities, budget: int, rank: str) -> np.ndarray:
    """Node indices: each community's share (:func:`allocate`) of its highest-ranked nodes, in
    community order."""
    if rank not in RANKS:
        raise ValueError(f"unknown InfoDist ranking {rank!r}; choose one of {list(RANKS)}")
    score = comm.scores[rank]
    chosen = []
    for m, k in enumerate(allocate(comm.sizes, budget)):
        members = np.flatnonzero(comm.module == m)
        order = np.lexsort((members, -score[members]))  # highest score, then lowest index
        chosen.append(members[order[:k]])
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


@register("infodist")
class InfoDist(Selector):
    """Settings: ``embedding`` (``encoder``: the encoder's features; ``umap``: UMAP of the
    encoder's features or of the pixels, ``umap.input``), ``graph`` (``softmax`` with threshold
    ``eta`` and optionally ``relative`` distances, or ``knn``: UMAP's fuzzy kNN graph),
    ``rank``, ``trials``. A class's communities are found once and reused for every budget."""

    def __init__(self, cfg: dict[str, Any], ctx: Any) -> None:
        super().__init__(cfg, ctx)
        if cfg["graph"] == "knn" and cfg["embedding"] != "umap":
            raise ValueError("InfoDist graph 'knn' is UMAP's kNN graph: it needs embedding 'umap'")
        self._cache: dict[int, tuple[np.ndarray, Communities]] = {}

    def embedding(self, pos: np.ndarray, seed: int) -> tuple[np.ndarray, sparse.csr_matrix | None]:
        """The class's embedding and, for UMAP, its kNN graph."""
        pool = self.ctx.pool
        if self.cfg["embedding"] == "encoder":
            return pool.features[pos], None
        umap_cfg = self.cfg["umap"]
        if umap_cfg["input"] == "pixels":
            x = pool.pixels(pos).reshape(len(pos), -1).astype(np.float32) / 255.0
        else:
            x = pool.features[pos]
        return umap_embedding(x, umap_cfg, seed)

    def partition(self, c: int) -> tuple[np.ndarray, Communities]:
        if c not in self._cache:
            pos = self.ctx.pool.of_class(c)
            seed = class_seed(self.ctx.seed, c)
            emb, knn = self.embedding(pos, seed)
            graph = knn if self.cfg["graph"] == "knn" else softmax_graph(
                emb, float(self.cfg["eta"]), relative=bool(self.cfg["relative"]))
            assert graph is not None  # 'knn' needs embedding 'umap' (checked in __init__)
            comm = communities(graph, seed, int(self.cfg["trials"]))
            log.info("class %d: %d candidates, %d edges, %d communities (sizes %s), codelength %.3f",
                     c, len(pos), graph.nnz, len(comm.sizes), sorted(comm.sizes.tolist())[::-1][:10],
                     comm.codelength)
            self._cache[c] = (pos, comm)
        return self._cache[c]

    def select(self, c: int, k: int) -> np.ndarray:
        pos, comm = self.partition(c)
        return pos[pick(comm, k, self.cfg["rank"])]
