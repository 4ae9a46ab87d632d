"""Scoring maps against known lesions: hand-made masks with known answers, and baselines that are what a
random map scores."""

from __future__ import annotations

import numpy as np
import pytest

from ctlib.localisation import (
    localisation_scores,
    mass_fraction,
    pointing_game,
    random_baseline,
    shifted_baseline,
)

SHAPE = (4, 8, 8)  # 256 voxels


def _cube() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:3, 2:4, 2:4] = True  # 8 voxels
    return mask


def test_pointing_game_known_answers():
    mask = _cube()
    inside = np.zeros(SHAPE)
    inside[2, 3, 3] = 1.0
    assert pointing_game(inside, mask) == 1.0
    outside = np.zeros(SHAPE)
    outside[2, 3, 5] = 1.0  # two columns right of the cube
    assert pointing_game(outside, mask) == 0.0
    assert pointing_game(outside, mask, tolerance=1) == 0.0
    assert pointing_game(outside, mask, tolerance=2) == 1.0
    # a constant map: the maximum is everywhere, the expected hit is the lesion's share
    assert pointing_game(np.ones(SHAPE), mask) == pytest.approx(8 / 256)
    two = np.zeros(SHAPE)
    two[1, 2, 2] = two[0, 0, 0] = 1.0  # tied maxima, one inside
    assert pointing_game(two, mask) == 0.5


def test_mass_fraction_known_answers():
    mask = _cube()
    assert mass_fraction(mask.astype(float), mask) == pytest.approx(1.0)
    half = np.where(mask, 1.0, 8 / 248)  # 8 inside, 248 outside carrying the same total
    assert mass_fraction(half, mask) == pytest.approx(0.5)
    assert mass_fraction(np.ones(SHAPE), mask) == pytest.approx(8 / 256)
    assert mass_fraction(np.where(mask, -5.0, 1.0), mask) == 0.0  # negative values are clipped


def test_random_baseline_is_what_random_maps_score():
    mask = _cube()
    base = random_baseline(mask)
    assert base == {"pointing": pytest.approx(8 / 256), "mass": pytest.approx(8 / 256)}
    assert random_baseline(mask, tolerance=1)["pointing"] == pytest.approx(4 * 4 * 4 / 256)
    rng = np.random.default_rng(0)
    maps = rng.random((4000, *SHAPE))
    hits = np.mean([pointing_game(m, mask) for m in maps])
    mass = np.mean([mass_fraction(m, mask) for m in maps])
    assert hits == pytest.approx(base["pointing"], abs=0.01)  # sd of the mean ~ 0.003
    assert mass == pytest.approx(base["mass"], abs=0.002)


def test_shifted_baseline_and_the_combined_scores():
    mask = _cube()
    uniform = shifted_baseline(np.ones(SHAPE), mask, n_shifts=20)
    assert uniform == {"pointing": pytest.approx(8 / 256), "mass": pytest.approx(8 / 256)}
    on_lesion = mask.astype(float)
    shifted = shifted_baseline(on_lesion, mask, n_shifts=500, seed=1)
    # the same cube moved at random overlaps the lesion on average by 8 / 256 of its mass
    assert shifted["mass"] == pytest.approx(8 / 256, abs=0.01)
    scores = localisation_scores(on_lesion, mask, n_shifts=50)
    assert scores["pointing"] == 1.0 and scores["mass"] == pytest.approx(1.0)
    assert scores["pointing_random"] == pytest.approx(8 / 256) and scores["mass_random"] == pytest.approx(8 / 256)
    assert {"pointing_shifted", "mass_shifted"} <= set(scores)
    assert "pointing_shifted" not in localisation_scores(on_lesion, mask)


def test_bad_inputs_are_named():
    mask = _cube()
    with pytest.raises(ValueError, match="bool"):
        pointing_game(np.ones(SHAPE), mask.astype(int))
    with pytest.raises(ValueError, match="same"):
        mass_fraction(np.ones((4, 8, 7)), mask)
    with pytest.raises(ValueError, match="empty"):
        pointing_game(np.ones(SHAPE), np.zeros(SHAPE, bool))
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(np.ones(SHAPE), mask, tolerance=-1)


def test_score_maps_and_the_table():
    from ctlib.localisation import localisation_table, score_maps

    classes = ("a", "b", "c")
    masks = np.zeros((3, *SHAPE), dtype=bool)
    masks[0] = _cube()
    masks[1, 0, 0, 0] = True  # class b: positive, a one-voxel lesion in the corner
    labels = np.array([1, 1, 0])  # c is negative: never scored

    def on_lesion(volume, k):
        return masks[k].astype(float)

    def centre(volume, k):
        m = np.zeros(SHAPE)
        m[2, 3, 3] = 1.0
        return m

    cases = [("v1", np.zeros(SHAPE), labels, masks), ("v2", np.zeros(SHAPE), np.array([1, 0, 1]), masks)]
    rows = score_maps(cases, {"oracle": on_lesion, "centre": centre}, model="toy", classes=classes,
                      progress=False)
    assert len(rows) == 3 * 2  # v1: a, b; v2: a (c has no lesion mask)
    table = localisation_table(rows)
    assert table.loc[("a", "toy", "oracle"), "n"] == 2 and table.loc[("b", "toy", "centre"), "n"] == 1
    assert table.loc[("a", "toy", "centre"), "pointing"] == 1.0  # (2, 3, 3) is inside the cube
    assert table.loc[("b", "toy", "centre"), "pointing"] == 0.0
    assert table.loc[("b", "toy", "oracle"), "mass"] == pytest.approx(1.0)
    assert table.loc[("b", "toy", "oracle"), "mass_random"] == pytest.approx(1 / 256)
    with pytest.raises(ValueError, match="v1: masks"):
        score_maps([("v1", np.zeros(SHAPE), labels, masks[:2])], {"oracle": on_lesion}, model="toy",
                   classes=classes, progress=False)
