"""The paper's figures and tables, drawn from arrays and frames the notebooks hand over.

Every plotting function builds a stand-alone :class:`matplotlib.figure.Figure` (no pyplot state, so it
is safe headless and in loops), returns it, and saves it when given ``path`` (PNG, 150 dpi, tight
bounding box; parent folders are created). Notebooks display the returned figure.

Images follow the data layer's convention: a volume is ``(S, H, W)`` (slices, rows = Y with anterior at
the top, columns = X), either in Hounsfield units or as model input in [-1, 1]; :func:`window` maps both
to display grey levels (pass ``normalized_range`` for model input).

One module per family of plots:

- :mod:`ctlib.figures.style`: the look, colours, CT windows (:func:`window`), captions, saving.
- :mod:`ctlib.figures.slices`: Figure 1 (:func:`plot_representative_slices` with :func:`pick_examples`),
  a slice montage and an interactive slice viewer.
- :mod:`ctlib.figures.pipeline`: Figure 2 (:func:`plot_pipeline`).
- :mod:`ctlib.figures.results`: Figure 3 (:func:`plot_per_class_auroc`), learning curves, the learned
  alpha, metrics against alpha and against the paper.
- :mod:`ctlib.figures.latent`: Figure 4 (:func:`plot_tsne`) and retrieval results.
- :mod:`ctlib.figures.attention`: Figure 5 (:func:`plot_attention_overlays`).
- :mod:`ctlib.figures.cohort`: label co-occurrence, HU histograms, class prevalence against Table 1.

Tables live in :mod:`ctlib.tables` (:func:`~ctlib.tables.save_table`, :func:`~ctlib.tables.to_markdown`,
:func:`~ctlib.tables.run_summary`).

Underscore names are package-private: the modules of ``ctlib.figures`` share them (``style``'s helpers),
nothing outside the package imports them.
"""

from ctlib.figures.attention import AttentionCase, plot_attention_overlays
from ctlib.figures.cohort import hu_sample, plot_class_prevalence, plot_cooccurrence, plot_hu_histograms
from ctlib.figures.latent import plot_retrieval, plot_tsne
from ctlib.figures.pipeline import plot_pipeline
from ctlib.figures.results import (
    plot_alpha_trajectory,
    plot_context_sweep,
    plot_learning_curves,
    plot_metric_comparison,
    plot_metrics_vs_alpha,
    plot_per_class_auroc,
)
from ctlib.figures.slices import (
    SliceExample,
    display_preprocessing,
    lung_mask,
    pick_examples,
    plot_representative_slices,
    plot_slice_montage,
    refine_examples,
    slice_viewer,
)
from ctlib.figures.style import (
    LUNG_WINDOW,
    MEDIASTINAL_WINDOW,
    SHORT_NAMES,
    label_caption,
    save_figure,
    short_name,
    window,
)

__all__ = [
    "LUNG_WINDOW",
    "MEDIASTINAL_WINDOW",
    "SHORT_NAMES",
    "AttentionCase",
    "SliceExample",
    "display_preprocessing",
    "hu_sample",
    "label_caption",
    "lung_mask",
    "pick_examples",
    "plot_alpha_trajectory",
    "plot_attention_overlays",
    "plot_context_sweep",
    "plot_class_prevalence",
    "plot_cooccurrence",
    "plot_hu_histograms",
    "plot_learning_curves",
    "plot_metric_comparison",
    "plot_metrics_vs_alpha",
    "plot_per_class_auroc",
    "plot_pipeline",
    "plot_representative_slices",
    "plot_retrieval",
    "plot_slice_montage",
    "plot_tsne",
    "refine_examples",
    "save_figure",
    "short_name",
    "slice_viewer",
    "window",
]
