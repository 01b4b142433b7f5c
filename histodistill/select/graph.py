"""Per-class graphs for InfoDist's community detection (Li & Kainz 2024, ZheLi2020/InfoDist).

* :func:`softmax_graph`: a directed weighted graph over embeddings. Node i's out-weights are the
  softmax over j != i of 1 / ||f_i - f_j||, and edges whose weight is below ``eta`` are dropped
  (InfoDist's ``construct_graph_norm``; its code also leaves the self term, with logit 0, in the
  softmax's denominator, which we do not: a node's weights sum to one over the others).
* :func:`umap_embedding`: UMAP (McInnes et al. 2018) to a few dimensions, and its fuzzy kNN graph
  (``UMAP.graph_``), InfoDist's other graph.

Both are vectorised: distances and softmax are computed a block of rows at a time with torch,
so memory is ``chunk x N`` and there is no Python loop over node pairs. A node keeps at most
1 / eta out-edges (its weights sum to one), so the graph has at most N / eta edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import sparse


def _distances(x: torch.Tensor, sq: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """Euclidean distances of rows ``start:start+chunk`` to all rows, as InfoDist's
    ``euclidean_dist`` computes them (||a||^2 + ||b||^2 - 2 a.b; twice as fast as cdist here)."""
    d2 = torch.addmm(sq[start:start + chunk, None] + sq[None], x[start:start + chunk], x.T, alpha=-2)
    return d2.clamp_min_(1e-12).sqrt_()


def mean_distance(x: torch.Tensor, chunk: int = 1024) -> float:
    """The mean Euclidean distance between distinct rows, block by block."""
    n, sq, total = len(x), (x * x).sum(1), 0.0
    for start in range(0, n, chunk):
        d = _distances(x, sq, start, chunk)
        local = torch.arange(len(d))
        d[local, local + start] = 0
        total += float(d.sum())
    return total / (n * (n - 1))


def softmax_graph(features: np.ndarray | torch.Tensor, eta: float, chunk: int = 1024, *,
                  relative: bool) -> sparse.csr_matrix:
    """(N, N) sparse directed graph: w_ij = softmax_{j != i}(1 / d_ij), kept where w_ij >= eta.
    With ``relative`` the distances are first divided by their mean over the class's pairs, so
    the graph no longer depends on the feature space's scale (not in InfoDist).

    ``features`` (N, D); float64 inputs are computed in float64, anything else in float32."""
    x = torch.as_tensor(np.asarray(features))
    x = x if x.dtype == torch.float64 else x.float()
    n = len(x)
    if n < 2:
        return sparse.csr_matrix((n, n), dtype=np.float64)
    scale = mean_distance(x, chunk) if relative else 1.0
    rows, cols, vals = [], [], []
    sq = (x * x).sum(1)
    for start in range(0, n, chunk):
        block = x[start:start + chunk]
        inv = scale / _distances(x, sq, start, chunk)
        local = torch.arange(len(block))
        inv[local, local + start] = float("-inf")  # no self-loops
        w = torch.softmax(inv, dim=1)
        r, c = torch.nonzero(w >= eta, as_tuple=True)
        rows.append((r + start).numpy())
        cols.append(c.numpy())
        vals.append(w[r, c].double().numpy())
    return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n, n))


def umap_embedding(features: np.ndarray, cfg: dict[str, Any], seed: int
                   ) -> tuple[np.ndarray, sparse.csr_matrix]:
    """UMAP of ``features`` to ``n_components`` dimensions with ``n_neighbors`` and ``min_dist``
    (InfoDist: 10, 10, 0.05, Euclidean) and its fuzzy kNN graph (symmetric, weights in (0, 1]).
    Seeded (which makes umap-learn run single-threaded). The first call in a process compiles
    numba code (~20 s)."""
    import umap  # imported here: numba compilation is paid only by runs that use UMAP

    n = len(features)
    neighbours = min(int(cfg["n_neighbors"]), max(n - 1, 2))
    mapper = umap.UMAP(n_neighbors=neighbours, n_components=int(cfg["n_components"]),
                       min_dist=float(cfg["min_dist"]), metric=str(cfg["metric"]),
                       random_state=seed, n_jobs=1,
                       init="random" if n <= int(cfg["n_components"]) + 1 else "spectral")
    embedding = mapper.fit_transform(np.asarray(features, dtype=np.float32))
    return np.asarray(embedding, dtype=np.float64), sparse.csr_matrix(mapper.graph_)
