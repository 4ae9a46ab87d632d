"""ctlib: the residual 2D+3D CT paper, made runnable.

Modules follow the paper's pipeline, data flowing one way:
``data`` (CT-RATE on disk) -> ``cache`` (prepared volumes; ``cohort``: the fixed split and the
profile-level preparation behind ``python -m ctlib.cache``) -> ``models`` -> ``train``
-> ``metrics`` -> ``comparison`` -> ``tables`` / ``figures`` / ``latent`` / ``attention`` ->
``localisation``. ``synthetic`` writes a
CT-RATE-format phantom dataset so that everything runs without the gated download.
"""

__version__ = "0.1.0"
