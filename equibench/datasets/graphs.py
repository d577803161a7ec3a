"""Neighbourhood graphs without pyg-lib: k-nearest-neighbour and radius graphs, per graph.

Edges follow PyG's convention (message j -> i): ``edge_index[:, e] = (j, i)``, source row 0,
target row 1. Both builders work graph by graph (``batch`` assigns nodes to graphs; nodes of
different graphs are never connected) with ``scipy.spatial.cKDTree`` in float64, and are
deterministic: edges are sorted by target ``i``, then by distance (kNN) or source index
(radius). Distances are Euclidean, so the graphs are invariant under E(3) up to rounding ties.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


def _as_numpy(pos: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(pos):
        pos = pos.detach().cpu().numpy()
    pos = np.asarray(pos, dtype=np.float64)
    if pos.ndim != 2:
        raise ValueError(f"positions must be [N, D], got shape {pos.shape}")
    return pos


def _groups(n: int, batch: torch.Tensor | np.ndarray | None) -> list[np.ndarray]:
    """Node indices of each graph (in order of first appearance of sorted graph ids)."""
    if batch is None:
        return [np.arange(n)]
    b = batch.detach().cpu().numpy() if torch.is_tensor(batch) else np.asarray(batch)
    if b.shape != (n,):
        raise ValueError(f"batch must have shape [{n}], got {b.shape}")
    order = np.argsort(b, kind="stable")
    _, starts = np.unique(b[order], return_index=True)
    return np.split(order, starts[1:])


def _knn_one(p: np.ndarray, k: int, loop: bool) -> tuple[np.ndarray, np.ndarray]:
    n = len(p)
    k_eff = min(k, n if loop else n - 1)
    if k_eff <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    tree = cKDTree(p)
    if loop:
        _, nbr = tree.query(p, k=k_eff)
        nbr = nbr.reshape(n, k_eff)
    else:
        _, nbr = tree.query(p, k=k_eff + 1)
        nbr = nbr.reshape(n, k_eff + 1)
        keep = nbr != np.arange(n)[:, None]
        # with coincident points the node itself may fall outside the k + 1 returned: drop the farthest
        keep[keep.all(axis=1), -1] = False
        nbr = nbr[keep].reshape(n, k_eff)
    src = nbr.reshape(-1)
    dst = np.repeat(np.arange(n), k_eff)
    return src.astype(np.int64), dst.astype(np.int64)


def _radius_one(p: np.ndarray, cutoff: float, loop: bool,
                max_num_neighbors: int | None) -> tuple[np.ndarray, np.ndarray]:
    n = len(p)
    pairs = cKDTree(p).query_pairs(cutoff, output_type="ndarray")  # i < j, distance <= cutoff
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    if loop:
        src = np.concatenate([src, np.arange(n)])
        dst = np.concatenate([dst, np.arange(n)])
    order = np.lexsort((src, dst))
    src, dst = src[order], dst[order]
    if max_num_neighbors is not None:
        # keep the nearest max_num_neighbors sources of every target (ties by index)
        d = np.linalg.norm(p[src] - p[dst], axis=1)
        order = np.lexsort((src, d, dst))
        src, dst = src[order], dst[order]
        rank = np.arange(len(dst)) - np.searchsorted(dst, dst, side="left")
        keep = rank < max_num_neighbors
        src, dst = src[keep], dst[keep]
        order = np.lexsort((src, dst))
        src, dst = src[order], dst[order]
    return src.astype(np.int64), dst.astype(np.int64)


def _build(pos, batch, one) -> torch.Tensor:
    p = _as_numpy(pos)
    srcs, dsts = [], []
    for idx in _groups(len(p), batch):
        s, d = one(p[idx])
        srcs.append(idx[s])
        dsts.append(idx[d])
    if not srcs:
        return torch.empty(2, 0, dtype=torch.long)
    return torch.from_numpy(np.stack([np.concatenate(srcs), np.concatenate(dsts)]))


def knn_graph(pos: torch.Tensor | np.ndarray, k: int, *, batch: torch.Tensor | np.ndarray | None = None,
              loop: bool = False) -> torch.Tensor:
    """Edges j -> i from each node i's ``k`` nearest nodes j of the same graph.

    Returns ``[2, E]`` long; every node has ``min(k, n_graph - 1)`` incoming edges (``n_graph``
    with ``loop=True``, which counts the node itself as its nearest neighbour).
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    return _build(pos, batch, lambda p: _knn_one(p, k, loop))


def knn_indices(pos: torch.Tensor | np.ndarray, k: int, *, loop: bool = False) -> np.ndarray:
    """The ``min(k, n - 1)`` nearest other nodes of every node of one graph, nearest first:
    ``[n, k]`` int64 (row i holds the sources j of the edges j -> i of ``knn_graph``)."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    p = _as_numpy(pos)
    src, _ = _knn_one(p, k, loop)
    return src.reshape(len(p), -1)


def radius_graph(pos: torch.Tensor | np.ndarray, cutoff: float, *,
                 batch: torch.Tensor | np.ndarray | None = None, loop: bool = False,
                 max_num_neighbors: int | None = None) -> torch.Tensor:
    """Edges j -> i for all pairs of the same graph with ``|x_i - x_j| <= cutoff``.

    Symmetric (both directions); ``max_num_neighbors`` keeps only the nearest sources of each
    target (no limit by default, unlike PyG's default of 32).
    """
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    return _build(pos, batch, lambda p: _radius_one(p, cutoff, loop, max_num_neighbors))
