"""Synthetic CT-RATE: a CT-RATE-format snapshot of chest CT phantoms with 18 drawn abnormalities.

The project's embedded default dataset; its card, ``DATA.md`` at the repository root, describes the
anatomy, every class's signature (size, HU, place, 2D or 3D and why), how large each is at each profile's
resolution, prevalence and co-occurrence, the lesion sidecar and what is not realistic.

:func:`generate` writes ``<out>/dataset/`` exactly as a downloaded CT-RATE subset lies on disk
(``/work/shared/ctrate-format.md``): ``train/`` and ``valid/`` trees of int16 ``.nii.gz`` volumes with
blank headers and raw scanner values (HU - RescaleIntercept), a few ``*_fixed`` re-uploads already in HU,
the labels, metadata and reports CSVs, the ``no_chest_*.txt`` lists (a head and an abdomen phantom per
split) and some label rows whose volume was "not downloaded". Beside it, ``<out>/truth/`` holds where
every lesion is (:func:`lesion_table`, :func:`lesion_masks`, :func:`lesion_masks_for_model`).

:data:`SIGNATURES` maps each class to a :class:`Signature` (description, ``needs_3d``, reason);
:func:`class_groups` splits the classes into those one axial slice suffices for and those that need 3D
context by construction. Array axes are (X, Y, Z): patient right -> left, anterior -> posterior,
caudal -> cranial.

Modules follow the phantom: ``anatomy``, ``signatures`` and ``lesions``, ``chest`` and ``render``,
``scanner``, ``plan``, ``reports``, ``writer``, ``truth``, ``card``. Underscore names are package-private:
the modules of ``ctlib.synthetic`` share them (geometry and anatomy helpers, the plan, the truth record),
nothing outside the package imports them (its tests read them from the module that defines them).
Run ``python -m ctlib.synthetic --help`` for the command line.
"""

from ctlib.synthetic.plan import PREVALENCE
from ctlib.synthetic.signatures import SIGNATURES, Signature, class_groups, signature_table
from ctlib.synthetic.truth import lesion_masks, lesion_masks_for_model, lesion_table
from ctlib.synthetic.writer import generate, main

__all__ = [
    "SIGNATURES",
    "Signature",
    "class_groups",
    "signature_table",
    "PREVALENCE",
    "generate",
    "main",
    "lesion_table",
    "lesion_masks",
    "lesion_masks_for_model",
]
