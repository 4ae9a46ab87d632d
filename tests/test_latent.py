"""t-SNE and latent-space retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from ctlib import latent as L


def _clustered(n_per: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four label patterns, each with its own feature centre: neighbours share labels."""
    rng = np.random.default_rng(seed)
    patterns = np.zeros((4, 18), dtype=int)
    patterns[1, [9]] = 1
    patterns[2, [9, 10, 15]] = 1
    patterns[3, [7, 13]] = 1
    centres = rng.normal(0, 5, (4, 12))
    idx = np.repeat(np.arange(4), n_per)
    feats = centres[idx] + rng.normal(0, 0.5, (idx.size, 12))
    return feats, patterns[idx]


def test_standardize_and_cosine():
    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [5.0, 5.0, 8.0]])
    z = L.standardize(x)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(z[:, 1], 0)  # constant column
    np.testing.assert_allclose(z[:, 0], [-1.224744871, 0, 1.224744871], rtol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        L.standardize(np.array([[np.nan, 1.0]]))


def test_tsne_shape_and_determinism():
    feats, _ = _clustered(10)
    a = L.tsne(feats, perplexity=30, seed=0)  # perplexity clipped for N = 40
    b = L.tsne(feats, perplexity=30, seed=0)
    assert a.shape == (40, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # the four clusters stay apart: each point's nearest embedded point is in its own cluster
    d = np.linalg.norm(a[:, None] - a[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert (np.argmin(d, axis=1) // 10 == np.arange(40) // 10).all()
    assert L.tsne(feats[:6]).shape == (6, 2)
    with pytest.raises(ValueError, match="at least 5"):
        L.tsne(feats[:4])


def test_nearest_cases_excludes_self_and_patient():
    feats = np.array([[0.0, 1.0], [0.05, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]])
    nn = L.nearest_cases(feats, k=2, standardized=False)
    assert nn.shape == (5, 2)
    assert nn[0].tolist() == [1, 2] and nn[3].tolist() == [4, 2]
    assert all(i not in row for i, row in enumerate(nn))
    groups = ["p0", "p0", "p1", "p2", "p2"]
    nn = L.nearest_cases(feats, k=2, groups=groups, standardized=False)
    assert nn[0].tolist() == [2, 4] and nn[3].tolist() == [2, 1]  # never the same patient
    assert L.nearest_cases(feats, k=1, query=4, standardized=False).tolist() == [[3]]
    with pytest.raises(ValueError, match="candidates"):
        L.nearest_cases(feats, k=4, groups=groups)
    with pytest.raises(ValueError, match="groups"):
        L.nearest_cases(feats, k=1, groups=["a", "b"])


def test_retrieval_beats_random_when_neighbours_share_labels():
    feats, labels = _clustered(20)
    groups = np.arange(len(feats)) // 2  # pairs of volumes from one patient
    rep = L.retrieval_report(feats, labels, k=5, groups=groups, n_permutations=200, seed=0)
    assert list(rep.index) == ["jaccard", "label_recall", "count_gap"]
    assert rep.loc["jaccard", "knn"] == pytest.approx(1.0)  # every neighbour has the same pattern
    assert rep.loc["jaccard", "ratio"] > 2.0
    assert rep.loc["label_recall", "knn"] == pytest.approx(1.0)
    assert rep.loc["count_gap", "knn"] == pytest.approx(0.0) and rep.loc["count_gap", "ratio"] < 0.2
    assert (rep["p_value"] <= 1 / 201 + 1e-12).all()
    assert rep.attrs == {"k": 5, "n_queries": 80, "n_database": 80, "n_permutations": 200}


def test_retrieval_from_a_database_of_other_volumes():
    feats, labels = _clustered(10)
    test = np.arange(0, 40, 5)  # 8 queries, 2 per cluster
    train = np.setdiff1d(np.arange(40), test)
    nn = L.nearest_cases(feats, 3, query=test, database=train)
    assert nn.shape == (8, 3) and np.isin(nn, train).all()
    assert (nn // 10 == (test // 10)[:, None]).all()
    rep = L.retrieval_report(feats, labels, k=3, query=test, database=train, n_permutations=50)
    assert rep.attrs["n_queries"] == 8 and rep.attrs["n_database"] == 32
    assert rep.loc["jaccard", "knn"] == pytest.approx(1.0)
    mask = np.zeros(40, bool)
    mask[train] = True
    np.testing.assert_array_equal(L.nearest_cases(feats, 3, query=test, database=mask), nn)
    with pytest.raises(ValueError, match="candidates"):
        L.nearest_cases(feats, 3, query=test, database=train[:2])


def test_retrieval_random_expectation_is_exact():
    # label patterns: 0 -> {}, 1 -> {a}, 2 -> {a, b}; the random baseline is the mean over candidates
    labels = np.zeros((3, 18), dtype=int)
    labels[1, 0] = 1
    labels[2, [0, 1]] = 1
    feats = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    rep = L.retrieval_report(feats, labels, k=1, n_permutations=0, standardized=False)
    # pairwise Jaccard: (0,1)=0, (0,2)=0, (1,2)=1/2; each query's candidate mean, then mean
    expected = np.mean([(0 + 0) / 2, (0 + 0.5) / 2, (0 + 0.5) / 2])
    assert rep.loc["jaccard", "random"] == pytest.approx(expected)
    # label recall: queries 1 and 2 only; 1 -> {0: 0, 2: 1}, 2 -> {0: 0, 1: 1/2}
    assert rep.loc["label_recall", "random"] == pytest.approx(np.mean([0.5, 0.25]))
    assert np.isnan(rep.loc["jaccard", "p_value"])


def test_retrieval_on_random_features_is_near_chance():
    rng = np.random.default_rng(1)
    labels = (rng.random((300, 18)) < 0.2).astype(int)
    ratios, ps = [], []
    for seed in range(3):
        feats = np.random.default_rng(10 + seed).normal(size=(300, 16))
        rep = L.retrieval_report(feats, labels, k=5, n_permutations=100, seed=seed)
        ratios.append(rep.loc["jaccard", "ratio"])
        ps.append(rep.loc["jaccard", "p_value"])
    assert 0.85 < np.mean(ratios) < 1.15
    assert max(ps) > 0.05
