"""The toy volumes of the learning checks (ctlib.toys): the cue is there, and only where it should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import minimum_filter

from ctlib.metrics import auroc_rank
from ctlib.models import CNN3D
from ctlib.toys import toy_dataset, toy_volume


def test_volumes_are_balanced_and_in_range() -> None:
    x, y = toy_dataset("ball", 20, seed=0)
    assert x.shape == (20, 16, 56, 56) and x.dtype == torch.float32 and y.sum() == 10
    assert x.min() >= -1.0 and x.max() <= 1.0
    torch.testing.assert_close(toy_dataset("ball", 20, seed=0)[0], x)  # seeded


def test_the_ball_is_the_wide_body() -> None:
    """A 3x3 in-plane minimum above -300 HU, away from structures that run through every slice (the rim),
    ranks the volumes with the ball first (vessels are at most 2.8 px wide; two that touch can pass)."""
    x, y = toy_dataset("ball", 60, seed=3)
    wide = minimum_filter(x.numpy(), size=(1, 1, 3, 3)) > -0.3
    through = wide.sum(axis=1, keepdims=True) >= x.shape[1] - 1
    score = (wide & ~through).sum(axis=(1, 2, 3))
    assert auroc_rank(y.numpy(), score)[0] > 0.95


def test_order_twins_hold_the_same_discs_in_another_order() -> None:
    """The same anatomy with and without the cue (one seed): the column's discs, what the volume adds to
    the anatomy alone (the ball toy's negative of that seed), cover the same areas slice by slice up to a
    reordering of the slices, and in another order."""
    for seed in range(5):
        anatomy = toy_volume(np.random.default_rng(seed), "ball", False)
        areas = [(toy_volume(np.random.default_rng(seed), "order", positive) != anatomy).sum(axis=(1, 2))
                 for positive in (True, False)]
        assert sorted(areas[0]) == sorted(areas[1]) and not np.array_equal(areas[0], areas[1])
        assert (areas[0] > 0).sum() == 7


def test_toy_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        toy_volume(rng, "cube", True)
    with pytest.raises(ValueError, match="at least 7"):
        toy_volume(rng, "order", True, slices=6)
    assert toy_volume(rng, "ball", True, slices=3, size=32).shape == (3, 32, 32)


def test_cnn_control_shapes() -> None:
    assert CNN3D(num_classes=1)(torch.zeros(2, 16, 56, 56)).shape == (2, 1)
    assert CNN3D(num_classes=3)(torch.zeros(1, 7, 30, 30)).shape == (1, 3)
