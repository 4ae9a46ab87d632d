"""Figure 2: the pipeline, drawn from the profile's sizes."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from ctlib.figures.style import (
    finish,
    new_figure,
)


# ---------------------------------------------------------------------------------------------
# Figure 2: the pipeline
# ---------------------------------------------------------------------------------------------
def plot_pipeline(
    *,
    num_slices: int = 100,
    image_size: int = 224,
    patch_size: int = 16,
    vit_dim: int = 512,
    hu_range: tuple[float, float] = (-1000.0, 1000.0),
    alpha: str = "α",
    path: str | Path | None = None,
) -> Figure:
    """Figure 2: the pipeline, drawn with patches and arrows.

    CT volume -> preprocessing -> 2D ResNet-18 per slice -> mean over slices -> x_2d; 3D ViT (spatial,
    then slice-wise transformer) -> projection -> residual_3d; x_2d + alpha * residual_3d -> head ->
    18 labels. The sizes printed in the boxes are the arguments (the paper's by default).
    """
    fig = new_figure(12.5, 4.6, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 40)
    ax.set_axis_off()

    colors = {"data": "#e8eef7", "2d": "#dbeedd", "3d": "#f7e3d4", "fuse": "#ece1f3", "out": "#f3f3f3"}

    def box(x: float, y: float, w: float, h: float, text: str, kind: str, bold: bool = False) -> None:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2",
                                    facecolor=colors[kind], edgecolor="0.35", linewidth=1.0))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.3,
                fontweight="bold" if bold else "normal", linespacing=1.35)

    def arrow(x0: float, y0: float, x1: float, y1: float, text: str = "", style: str = "-|>",
              rad: float = 0.0) -> None:
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=12,
                                     color="0.25", linewidth=1.1, connectionstyle=f"arc3,rad={rad}"))
        if text:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 1.1, text, ha="center", va="bottom", fontsize=7.5,
                    color="0.25", style="italic")

    s, n = num_slices, image_size
    grid = image_size // patch_size
    lo, hi = (int(v) for v in hu_range)
    box(1, 14, 10, 12, "CT volume\n(NIfTI)\n\nvoxels → HU", "data")
    box(15, 12, 14, 16, f"Preprocessing\n\nHU clip [{lo}, {hi}]\ncentre crop / pad\ncentre {s} slices\n"
        f"scale to [-1, 1]\n→ {s}×{n}×{n}", "data")
    arrow(11.8, 20, 14.2, 20)

    # 2D branch (top)
    box(34, 28, 15, 9, f"2D ResNet-18\nper slice ({n}×{n}, 1 channel)\nImageNet init (paper)", "2d", bold=False)
    box(53, 29.5, 9, 6, "mean over\nslices", "2d")
    box(66, 29.5, 7, 6, r"$x_{2d}$" + "\n512", "2d")
    arrow(29.8, 22, 33.6, 31, rad=-0.15)
    arrow(49.4, 32.5, 52.6, 32.5, f"{s}×512")
    arrow(62.4, 32.5, 65.6, 32.5)

    # 3D branch (bottom)
    box(34, 2, 15, 11, f"3D ViT (from scratch)\n{patch_size}×{patch_size} patches: {grid}×{grid}/slice\n"
        "spatial transformer\n→ slice-wise transformer", "3d")
    box(53, 4.5, 9, 6, "mean of\ntokens →\nprojection", "3d")
    box(66, 4.5, 7, 6, r"$residual_{3d}$" + "\n512", "3d")
    arrow(29.8, 18, 33.6, 9, rad=0.15)
    arrow(49.4, 7.5, 52.6, 7.5, f"{vit_dim}")
    arrow(62.4, 7.5, 65.6, 7.5)

    # fusion
    ax.add_patch(Circle((79, 20), 2.6, facecolor=colors["fuse"], edgecolor="0.35", linewidth=1.0))
    ax.text(79, 20, "+", ha="center", va="center", fontsize=16)
    arrow(73.4, 32.5, 77.6, 22.2, rad=-0.2)
    arrow(73.4, 7.5, 77.6, 17.8, f"× {alpha}", rad=0.2)
    ax.text(86.5, 11.5, r"$x_{2d} + $" + alpha + r"$\cdot residual_{3d}$", ha="center", va="top",
            fontsize=9)
    box(84, 16.5, 5.5, 7, "head\nLinear", "fuse")
    arrow(81.7, 20, 83.6, 20)
    box(93, 13.5, 5.5, 13, "18\nlabels\n(sigmoid,\nBCE)", "out")
    arrow(89.9, 20, 92.6, 20)

    ax.text(50, 39.3, "Residual 2D + 3D fusion: the 3D ViT refines a strong 2D baseline", ha="center",
            va="top", fontsize=11, fontweight="bold")
    ax.text(86.5, 7.5, f"{alpha} = 0: ResNet only\n{alpha} = 1: equal weights\nlearned {alpha}: a parameter",
            ha="center", va="top", fontsize=7.5, color="0.3", linespacing=1.4)
    return finish(fig, path)
