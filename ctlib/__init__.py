"""ctlib: the residual 2D+3D CT paper, made runnable.

Modules follow the paper's pipeline, data flowing one way:
``data`` (CT-RATE on disk) -> ``preprocess`` (section 3.1) -> ``split`` (the patient split, Table 1)
-> ``cache`` (prepared volumes) -> ``prepare`` (``python -m ctlib.prepare``: every cache of a profile)
-> ``models`` -> ``train`` (with ``distributed``) -> ``runs`` (a run on disk) -> ``metrics`` ->
``comparison`` -> ``tables`` / ``figures`` / ``latent`` / ``attention`` -> ``localisation``;
``launch`` starts training runs for the notebooks. ``synthetic`` writes a CT-RATE-format phantom
dataset so that everything runs without the gated download.
"""

__version__ = "0.1.0"
