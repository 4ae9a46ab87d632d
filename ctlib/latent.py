"""The latent space of section 5: t-SNE (Figure 4) and case retrieval by nearest neighbours.

The paper proposes retrieval ("input a new patient scan and identify similar cases in a database")
from the fusion model's volume features. :func:`retrieval_report` measures it: do a query's nearest
cases in the latent space share its abnormalities more than cases drawn at random do?

Distances are cosine distances between standardised features (each feature centred and scaled to
unit variance over the volumes, so no single large feature dominates). A case never retrieves
itself and, given ``groups`` (patient ids), never a volume of the same patient: another
reconstruction of the same scan would be trivially similar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["nearest_cases", "retrieval_report", "standardize", "tsne"]

_BLOCK = 512  # query rows handled at once: memory O(_BLOCK * N)


def standardize(features: np.ndarray) -> np.ndarray:
    """Centre each column and scale it to unit variance: (N, D) -> (N, D) float64.

    Constant columns become 0 (they carry no information about any volume).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values")
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _unit_rows(features: np.ndarray, standardized: bool) -> np.ndarray:
    x = standardize(features) if standardized else np.asarray(features, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def tsne(
    features: np.ndarray,
    *,
    perplexity: float = 30.0,
    seed: int = 0,
    n_jobs: int = 1,
    standardized: bool = True,
) -> np.ndarray:
    """openTSNE embedding of volume features: (N, D) -> (N, 2), deterministic for a given seed.

    Args:
        features: (N, D) volume features (e.g. ``features.npz``'s ``features``), N >= 5.
        perplexity: effective neighbourhood size; clipped to (N - 1) / 3 for small N (openTSNE needs
            3 * perplexity neighbours).
        seed: random state (PCA initialisation makes the result depend on it only through the
            neighbour search).
        n_jobs: threads.
        standardized: standardise features first (see :func:`standardize`).
    """
    from openTSNE import TSNE

    x = standardize(features) if standardized else np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 volumes, got {n}")
    if perplexity <= 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}")
    perp = float(min(perplexity, (n - 1) / 3.0))
    model = TSNE(n_components=2, perplexity=perp, random_state=seed, n_jobs=n_jobs, initialization="pca",
                 neighbors="exact" if n < 1000 else "auto", verbose=False)
    return np.asarray(model.fit(x), dtype=np.float64)


def _group_codes(groups: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), one id per volume, got {g.shape}")
    return np.unique(g, return_inverse=True)[1].reshape(n)


def _query_indices(query: int | Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    if query is None:
        return np.arange(n)
    q = np.atleast_1d(np.asarray(query))
    if q.ndim != 1 or q.dtype.kind not in "iu":
        raise ValueError(f"query must be an index or a 1-d array of indices, got {query!r}")
    if q.size and (q.min() < -n or q.max() >= n):
        raise ValueError(f"query indices must lie in [0, {n}), got {q.min()}..{q.max()}")
    return q % n


def _k_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest entries of each row, ascending (ties: lower index first)."""
    part = np.argpartition(values, k - 1, axis=1)[:, :k] if k < values.shape[1] else \
        np.tile(np.arange(values.shape[1]), (values.shape[0], 1))
    vals = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def nearest_cases(
    features: np.ndarray,
    k: int = 5,
    query: int | Sequence[int] | np.ndarray | None = None,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    database: Sequence[int] | np.ndarray | None = None,
    standardized: bool = True,
) -> np.ndarray:
    """Indices of each query's ``k`` nearest cases by cosine distance, nearest first.

    Args:
        features: (N, D) features of all volumes (queries and database).
        k: neighbours per query.
        query: row indices of the query volumes; None: every row.
        groups: (N,) patient of each volume: volumes of the query's patient are never returned.
            None: only the query itself is excluded.
        database: the rows that may be retrieved, as indices or an (N,) bool mask; None: every row.
        standardized: standardise features over the N volumes first.

    Returns:
        (Q, k) int array of row indices (a single int query gives (1, k)).
    """
    u = _unit_rows(features, standardized)
    n = u.shape[0]
    codes = _group_codes(groups, n)
    q = _query_indices(query, n)
    in_db = _database_mask(database, n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.empty((q.size, k), dtype=np.int64)
    for start in range(0, q.size, _BLOCK):
        qb = q[start:start + _BLOCK]
        allowed = _allowed(codes, qb, in_db)
        fewest = int(allowed.sum(axis=1).min())
        if fewest < k:
            raise ValueError(f"k={k} neighbours requested but a query has only {fewest} candidates "
                             "(database volumes outside its own patient)")
        d = 1.0 - u[qb] @ u.T
        d[~allowed] = np.inf
        out[start:start + qb.size] = _k_smallest(d, k)
    return out


def _database_mask(database: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    if database is None:
        return np.ones(n, dtype=bool)
    d = np.asarray(database)
    if d.dtype == bool:
        if d.shape != (n,):
            raise ValueError(f"a boolean database mask must have shape ({n},), got {d.shape}")
        return d
    mask = np.zeros(n, dtype=bool)
    mask[_query_indices(d, n)] = True
    return mask


def _allowed(codes: np.ndarray, qb: np.ndarray, in_db: np.ndarray) -> np.ndarray:
    """(b, N) bool: candidate j may be retrieved for query qb[i] (in the database, another patient)."""
    return (codes[None, :] != codes[qb][:, None]) & in_db[None, :]


def _pair_measures(yq: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """(b, C) query labels and (N, C) database labels -> (b, N) matrices of each measure."""
    inter = yq @ y.T
    return _measures_from(inter, yq.sum(axis=1)[:, None], y.sum(axis=1)[None, :])


def _measures_from(inter: np.ndarray, nq: np.ndarray, nd: np.ndarray) -> dict[str, np.ndarray]:
    union = nq + nd - inter
    jacc = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)  # two normal scans agree
    recall = np.where(nq > 0, inter / np.where(nq > 0, nq, 1.0), np.nan)
    return {"jaccard": jacc, "label_recall": recall, "count_gap": np.abs(nq - nd) + 0.0 * inter}


def _neighbour_means(y: np.ndarray, q: np.ndarray, nbrs: np.ndarray) -> dict[str, float]:
    """Each measure between the queries ``q`` and their neighbours, averaged over neighbours and then
    over the queries it is defined for: labels (N, C), queries (Q,), neighbours (Q, k) -> measure -> float."""
    yq = y[q]  # (Q, C)
    yn = y[nbrs]  # (Q, k, C)
    inter = np.einsum("qc,qkc->qk", yq, yn)
    m = _measures_from(inter, yq.sum(axis=1)[:, None], yn.sum(axis=2))
    out = {}
    for name, mat in m.items():
        per_query = mat.mean(axis=1)
        valid = ~np.isnan(per_query)
        out[name] = float(per_query[valid].mean()) if valid.any() else np.nan
    return out


_MEASURES = {
    "jaccard": ("higher", "mean Jaccard index of the query's and the case's label sets (1 if both are normal)"),
    "label_recall": ("higher", "mean fraction of the query's abnormalities the case also has (queries "
                               "with at least one abnormality)"),
    "count_gap": ("lower", "mean absolute difference in the number of abnormalities"),
}


def retrieval_report(
    features: np.ndarray,
    labels: np.ndarray,
    k: int = 5,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    query: Sequence[int] | np.ndarray | None = None,
    database: Sequence[int] | np.ndarray | None = None,
    n_permutations: int = 1000,
    seed: int = 0,
    standardized: bool = True,
) -> pd.DataFrame:
    """How much a query's k nearest cases share its labels, against cases drawn at random.

    Each query volume (default: every volume) is compared with its k nearest cases (:func:`nearest_cases`) are compared with it by three
    measures: ``jaccard`` (label-set overlap), ``label_recall`` (share of the query's abnormalities
    present in the case) and ``count_gap`` (difference in the number of abnormalities, the colouring of
    Figure 4). ``random`` is the exact expectation for cases drawn uniformly from the query's
    candidates (the database volumes that are not its patient's). The paper's use case is ``query`` =
    test volumes and ``database`` = the training volumes. ``p_value`` is a permutation test of "the
    features say nothing about the labels": labels are shuffled over the volumes while the neighbour
    graph stays fixed (so hub volumes, neighbours of many queries, are accounted for), and it is the
    share of shuffles (plus one) whose neighbours score at least as well as the real ones.

    Args:
        features: (N, D) volume features.
        labels: (N, C) 0/1 labels.
        k: cases retrieved per query.
        groups: (N,) patient ids (volumes of the query's patient are never retrieved).
        query: row indices of the queries; None: every row.
        database: rows that may be retrieved (indices or (N,) bool mask); None: every row.
        n_permutations: label shuffles for the p-value (0: no p-value).
        seed: seed of the shuffles.
        standardized: standardise features first.

    Returns:
        DataFrame indexed by measure with columns ``knn``, ``random``, ``ratio`` (knn / random),
        ``null_sd`` (SD of the measure over the shuffles), ``p_value``, ``better`` ("higher" or "lower")
        and ``description``; ``attrs`` hold ``k``, ``n_queries`` and ``n_permutations``.
    """
    y = (np.asarray(labels) > 0).astype(np.float64)
    u = _unit_rows(features, standardized)
    n = u.shape[0]
    if y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"labels must be (N={n}, C), got {y.shape}")
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    codes = _group_codes(groups, n)
    q = _query_indices(query, n)
    in_db = _database_mask(database, n)
    nbrs = nearest_cases(features, k, q, groups=groups, database=in_db, standardized=standardized)
    names = list(_MEASURES)
    observed = _neighbour_means(y, q, nbrs)

    # Exact random baseline: the mean of each measure over all candidates of each query.
    rand_sum = dict.fromkeys(names, 0.0)
    count = dict.fromkeys(names, 0)
    for start in range(0, q.size, _BLOCK):
        qb = q[start:start + _BLOCK]
        measures = _pair_measures(y[qb], y)
        allowed = _allowed(codes, qb, in_db)
        for m in names:
            mat = measures[m]
            valid = ~np.isnan(mat[:, 0])
            exp_vals = np.where(allowed, np.nan_to_num(mat), 0.0).sum(axis=1) / allowed.sum(axis=1)
            rand_sum[m] += float(exp_vals[valid].sum())
            count[m] += int(valid.sum())

    rng = np.random.default_rng(seed)
    null = {m: np.empty(n_permutations) for m in names}
    for r in range(n_permutations):
        shuffled = _neighbour_means(y[rng.permutation(n)], q, nbrs)
        for m in names:
            null[m][r] = shuffled[m]

    rows = []
    for m in names:
        knn = observed[m]
        rand = rand_sum[m] / count[m] if count[m] else np.nan
        better, desc = _MEASURES[m]
        if n_permutations and np.isfinite(knn):
            tol = 1e-12
            as_good = null[m] >= knn - tol if better == "higher" else null[m] <= knn + tol
            p = (1.0 + float(as_good.sum())) / (1.0 + n_permutations)
            sd = float(np.nanstd(null[m], ddof=1)) if n_permutations > 1 else np.nan
        else:
            p, sd = np.nan, np.nan
        ratio = knn / rand if np.isfinite(rand) and rand != 0 else np.nan
        rows.append((m, knn, rand, ratio, sd, p, better, desc))
    frame = pd.DataFrame(rows, columns=["measure", "knn", "random", "ratio", "null_sd", "p_value", "better",
                                        "description"]).set_index("measure")
    frame.attrs.update(k=int(k), n_queries=int(q.size), n_database=int(in_db.sum()),
                       n_permutations=int(n_permutations))
    return frame
