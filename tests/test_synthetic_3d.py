"""The 3D-context experiment is honest by construction: the lung nodule (the one ``needs_3d`` class) changes the
order of a volume's slices and nothing else, so a model that sees a volume as a set of slices cannot tell a
positive from its negative twin, while a 3D model can.

- (a) the ResNet's logits and features, and so the fusion's 2D term, are the same bits for any permutation of
  a volume's slices;
- (b) the twin test: one patient drawn with and without a nodule gives, after the profile's own
  preprocessing (demo and smoke), the same multiset of model-input slices, compared byte for byte;
- the cue is there at the model input: the large discs sit one slice higher in the positive;
- (c) a small 3D CNN trained for a few seconds on the columns finds the cue; the same CNN on a copy whose
  slices are shuffled does not.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from torch import nn

from ctlib import synthetic
from ctlib.data import CLASSES
from ctlib.metrics import auroc_rank
from ctlib.models import Fusion, ResNet2D, ViT3D
from ctlib.prepare import context_grid
from ctlib.preprocess import preprocess
from ctlib.profiles import DEMO, SMOKE
from ctlib.synthetic import column
from ctlib.synthetic.column import ContextGrid
from ctlib.synthetic.scanner import Context, phantom

NODULE = "Lung nodule"
PROFILES = {"demo": DEMO, "smoke": SMOKE}


def _context(profile, strength: float = 1.0) -> Context:
    return Context(strength, ContextGrid(*context_grid(profile)))


@cache
def _twins(name: str, seed: int, strength: float = 1.0, others: bool = False):
    """(positive, negative) phantoms of one patient at the profile's synthetic size, and their model inputs."""
    prof = PROFILES[name]
    labels = dict.fromkeys(CLASSES, int(others))
    out = []
    for positive in (1, 0):
        ph = phantom({**labels, NODULE: positive}, seed=seed, shape=prof.synthetic_shape,
                      spacing=prof.synthetic_spacing, context=_context(prof, strength))
        x = preprocess(ph.hu.astype(np.float32), spacing=prof.synthetic_spacing, target_spacing=prof.target_spacing,
                       size=prof.size_3d, num_slices=prof.num_slices, hu_range=prof.hu_range)
        out.append((ph, x))
    return out


def test_the_3d_class_is_the_constructed_one():
    groups = synthetic.class_groups()
    assert groups["3D"] == [NODULE]
    assert "Lymphadenopathy" in groups["2D"]  # short axis on one axial slice: a 2D finding
    assert sorted(groups["2D"] + groups["3D"]) == sorted(CLASSES)
    assert [c for c in CLASSES if c in groups["2D"]] == groups["2D"]
    for c in CLASSES:
        assert synthetic.SIGNATURES[c].reason and synthetic.SIGNATURES[c].description


def test_column_pattern_is_a_rotation():
    neg, pos = column.radii_pattern(False), column.radii_pattern(True)
    assert sorted(neg) == sorted(pos) and neg != pos  # the same multiset of radii, another order
    assert [neg[j] for j in column.twin_order()] == pos
    assert sorted(column.twin_order()[: column.M]) == list(range(column.M))  # only the still slots move


# ------------------------------------------------------------------------------------------------------------
# (a) permutation invariance of the 2D models
# ------------------------------------------------------------------------------------------------------------
def test_resnet_and_the_fusions_2d_term_ignore_the_order_of_slices():
    """Exact equality, not a tolerance: ``ctlib.models.slice_mean`` sorts the slice values before averaging
    (a plain float mean of permuted terms moves by ~1e-7); the backbone computes each slice the same way
    wherever it sits in the batch (eval mode: BatchNorm uses its running statistics)."""
    torch.manual_seed(0)
    resnet = ResNet2D().eval()
    fusion = Fusion(resnet=resnet, vit=ViT3D(image_size=32, patch_size=8, max_slices=16, dim=32, spatial_depth=1,
                                             slice_depth=1, heads=2, dim_head=16, mlp_dim=64)).eval()
    x = torch.randn(2, 16, 32, 32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logits, feats = resnet(x, return_features=True)
        for _ in range(3):
            perm = torch.randperm(16, generator=gen)
            lp, fp = resnet(x[:, perm], return_features=True)
            assert torch.equal(lp, logits) and torch.equal(fp, feats)
            assert torch.equal(fusion.beta * fusion.resnet.features(x[:, perm]), fusion.beta * feats)
        # the real twins: identical ResNet outputs for a positive and its negative twin
        (_, xp), (_, xn) = _twins("smoke", 0)
        p, n = (resnet(torch.from_numpy(v)[None].expand(1, -1, -1, -1)[:, :, :32, :32].contiguous()) for v in (xp, xn))
        assert torch.equal(p, n)


# ------------------------------------------------------------------------------------------------------------
# (b) the twin test, at each profile's model input
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("seed,strength,others", [(0, 1.0, False), (1, 1.0, True), (2, 0.5, False), (3, 0.0, True)])
def test_twins_are_the_same_slices_in_another_order(name, seed, strength, others):
    (pos, xp), (neg, xn) = _twins(name, seed, strength, others)
    assert xp.shape == xn.shape == (PROFILES[name].num_slices, *PROFILES[name].size_3d[1::-1])
    assert sorted(s.tobytes() for s in xp) == sorted(s.tobytes() for s in xn)
    differ = int((xp != xn).any(axis=(1, 2)).sum())
    assert differ == column.M  # the column's still slots, rotated (noise moves with its slice)
    assert pos.truth.mask().any() and (pos.truth.mask() >> CLASSES.index(NODULE) & 1).any()
    assert not (neg.truth.mask() >> CLASSES.index(NODULE) & 1).any()


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_large_discs_sit_one_slice_higher_in_a_positive(name):
    """The cue at the model input: per column, the dense area around its axis in each of its slices. Slices
    0..M-1 show the same chest, so their difference is the disc alone."""
    prof = PROFILES[name]
    first = context_grid(prof)[1]
    half = 3 if name == "demo" else 1
    for seed in range(3):
        (pos, xp), (neg, xn) = _twins(name, seed)
        lay, g = neg.anatomy.columns, neg.grid
        crop = (prof.synthetic_shape[0] // 2 - prof.size_3d[0]) // 2
        for cx, cy, *_ in lay.columns:
            i = int(np.argmin(np.abs(g.x - cx))) // 2 - crop
            j = int(np.argmin(np.abs(g.y - cy))) // 2 - crop

            win = (slice(j - half, j + half + 1), slice(i - half, i + half + 1))
            a_neg = [int((xn[lay.k0 + s - first][win] > -0.3).sum()) for s in range(column.K)]
            a_pos = [int((xp[lay.k0 + s - first][win] > -0.3).sum()) for s in range(column.K)]
            assert a_neg[0] >= a_neg[2] + (4 if name == "demo" else 1), (a_neg, a_pos)  # R R r ...
            assert a_pos[2] >= a_pos[0] + (4 if name == "demo" else 1), (a_neg, a_pos)  # r R R ...
            assert a_pos[1] == a_neg[1] or abs(a_pos[1] - a_neg[1]) <= 1 and name == "smoke"
            assert a_pos[3:] == a_neg[3:]  # above the still slots nothing moved


# ------------------------------------------------------------------------------------------------------------
# (c) a 3D model finds the cue, a shuffled-slice copy does not
# ------------------------------------------------------------------------------------------------------------
def _column_crops(seeds) -> tuple[np.ndarray, np.ndarray]:
    """Around every column of twins drawn at the demo's model resolution (5.5 mm pixels, 10 mm slices): the
    column's slices and one above and below, 9x9 pixels, HU / 1000."""
    grid = ContextGrid(group=1)
    xs, ys = [], []
    for seed in seeds:
        for positive in (0, 1):
            ph = phantom({NODULE: positive}, seed=seed, shape=(64, 64, 24), spacing=(5.5, 5.5, 10.0),
                          context=Context(1.0, grid))
            hu = np.clip(ph.hu.astype(np.float32), -1000, 1000) / 1000
            lay, g = ph.anatomy.columns, ph.grid
            for cx, cy, *_ in lay.columns:
                i, j = int(np.argmin(np.abs(g.x - cx))), int(np.argmin(np.abs(g.y - cy)))
                xs.append(hu[i - 4:i + 5, j - 4:j + 5, lay.k0 - 1:lay.k0 + column.K + 1].transpose(2, 1, 0))
                ys.append(positive)
    return np.stack(xs), np.array(ys, np.float32)


def _fit_and_score(xtr, ytr, xte, yte, steps: int = 120) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xtr, ytr = torch.from_numpy(xtr)[:, None], torch.from_numpy(ytr)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(model(xtr).squeeze(-1), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = model(torch.from_numpy(xte)[:, None]).squeeze(-1).numpy()
    return float(auroc_rank(yte[:, None], p[:, None])[0])


def test_a_3d_cnn_finds_the_cue_where_a_shuffled_copy_does_not():
    torch.set_num_threads(1)
    xtr, ytr = _column_crops(range(10))
    xte, yte = _column_crops(range(100, 106))
    ordered = _fit_and_score(xtr, ytr, xte, yte)
    rng = np.random.default_rng(0)
    shuffle = lambda x: np.stack([v[rng.permutation(len(v))] for v in x])  # noqa: E731
    shuffled = _fit_and_score(shuffle(xtr), ytr, shuffle(xte), yte)
    print(f"3D CNN on the nodule columns: AUROC {ordered:.3f} in order, {shuffled:.3f} with shuffled slices")
    assert ordered >= 0.9
    assert shuffled <= 0.75


def test_card_measures_the_nodule_as_a_dense_body():
    """The data card's table (smoke resolution, one patient per class): the nodule (the large discs of a
    positive) is dense against the lung around it."""
    from ctlib.synthetic.card import measure

    table = measure(SMOKE, seeds=(0,))
    assert list(table.index) == list(CLASSES)
    assert list(table.index[table["group"] == "3D"]) == [NODULE]
    row = table.loc[NODULE]
    assert row["lesions"] >= 1 and float(row["vs shell HU"]) > 100, row.to_dict()
    assert float(table.loc["Pleural effusion", "vs negative HU"]) > 300  # a 2D lesion: visible as a change
