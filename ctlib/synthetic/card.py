"""How large and how contrasted each signature is at a profile's model-input resolution (DATA.md's table).

``python -m ctlib.synthetic.card [--seeds N] [--profiles demo smoke]`` renders, per class and seed, the same
patient with and without that one class at the profile's synthetic shape and spacing, puts the image and
the lesion truth through the profile's preprocessing (:func:`ctlib.synthetic.lesion_masks_for_model`'s
geometry), and measures every lesion (3D connected component of the class mask in the model frame):
in-plane extent (pixels, the larger of the two axes), slices, and two contrasts: mean HU inside the lesion
minus that of the one-voxel shell around it, and minus that of the same voxels in the same patient drawn
without the class (about 0 for the 3D classes by construction: a vessel of the same HU is there).
A class whose mask has no voxel at least half covered at that resolution shows 0 lesions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from ctlib.data import CLASSES
from ctlib.preprocess import to_model_frame
from ctlib.profiles import PROFILES
from ctlib.synthetic.scanner import phantom
from ctlib.synthetic.signatures import SIGNATURES


def _lesions(hu: np.ndarray, neg: np.ndarray, mask: np.ndarray) -> list[tuple[int, int, float, float]]:
    """(in-plane extent px, slices, contrast vs the shell HU, contrast vs the negative HU) of each 3D
    component of ``mask`` (S, H, W) in ``hu``; ``neg`` is the same patient without the class."""
    lab, n = ndimage.label(mask)
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab == i
        shell = ndimage.binary_dilation(comp, np.ones((3, 3, 3), bool)) & ~mask
        inside = float(hu[comp].mean())
        around = float(hu[shell].mean()) if shell.any() else float("nan")
        out.append((max(sl[1].stop - sl[1].start, sl[2].stop - sl[2].start), sl[0].stop - sl[0].start,
                    inside - around, inside - float(neg[comp].mean())))
    return out


def measure(profile, seeds: Sequence[int] = (0, 1, 2)) -> pd.DataFrame:
    """One row per class (CLASSES order): median lesion size and contrast at ``profile``'s model input.

    Columns: ``group`` (2D/3D), ``lesions`` (mean per positive volume), ``in-plane px`` and ``slices``
    (median [min-max] over lesions), ``vs shell HU`` (lesion minus the voxels around it) and ``vs negative HU``
    (lesion minus the same voxels of the same patient without the class), medians; ``mm per px``.
    """
    frame = dict(target_spacing=profile.target_spacing, size=profile.size_3d, num_slices=profile.num_slices)
    spacing = profile.synthetic_spacing
    rows = []
    for k, cls in enumerate(CLASSES):
        found, vols = [], 0
        for seed in seeds:
            ph = phantom({cls: 1}, seed=seed, shape=profile.synthetic_shape, spacing=spacing)
            off = phantom({}, seed=seed, shape=profile.synthetic_shape, spacing=spacing)
            hu, neg = (np.clip(to_model_frame(v.hu.astype(np.float32), spacing=spacing, fill=-1000.0, **frame),
                               -1000.0, 1000.0) for v in (ph, off))
            m = ((ph.truth.mask() >> k) & 1).astype(np.float32)
            framed = to_model_frame(m, spacing=spacing, fill=0.0, **frame) >= 0.5
            found += _lesions(hu, neg, framed)
            vols += 1
        ext = np.array([f[0] for f in found]) if found else np.zeros(1)
        nz = np.array([f[1] for f in found]) if found else np.zeros(1)
        con = np.array([f[2] for f in found]) if found else np.full(1, np.nan)
        sig = np.array([f[3] for f in found]) if found else np.full(1, np.nan)
        rows.append({
            "class": cls,
            "group": "3D" if SIGNATURES[cls].needs_3d else "2D",
            "lesions": round(len(found) / vols, 1),
            "in-plane px": f"{np.median(ext):.0f} [{ext.min():.0f}-{ext.max():.0f}]",
            "slices": f"{np.median(nz):.0f} [{nz.min():.0f}-{nz.max():.0f}]",
            "vs shell HU": f"{np.median(con):+.0f}",
            "vs negative HU": f"{np.median(sig):+.0f}",
        })
    px = profile.target_spacing[0] if profile.target_spacing else spacing[0]
    return pd.DataFrame(rows).set_index("class").assign(**{"mm per px": px})


def main(argv: list[str] | None = None) -> int:
    """Print the size table of each profile as markdown."""
    parser = argparse.ArgumentParser(prog="python -m ctlib.synthetic.card", description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["demo", "smoke"], choices=sorted(PROFILES))
    parser.add_argument("--seeds", type=int, default=3, help="patients per class")
    args = parser.parse_args(argv)
    for name in args.profiles:
        prof = PROFILES[name]
        print(f"\n### {name}: model input {prof.size_3d[0]}x{prof.size_3d[1]} px of "
              f"{prof.target_spacing[0] if prof.target_spacing else prof.synthetic_spacing[0]:g} mm, "
              f"{prof.num_slices} slices of "
              f"{prof.target_spacing[2] if prof.target_spacing else prof.synthetic_spacing[2]:g} mm\n")
        print(_markdown(measure(prof, range(args.seeds)).drop(columns="mm per px")))
    return 0


def _markdown(df: pd.DataFrame) -> str:
    """A pipe table of ``df`` with its index as the first column."""
    cols = [df.index.name or "", *map(str, df.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *map(str, r)]) + " |" for i, r in zip(df.index, df.to_numpy(), strict=True)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
