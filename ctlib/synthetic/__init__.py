"""Synthetic CT-RATE: a CT-RATE-format snapshot of chest CT phantoms with 18 drawn abnormalities.

The project's embedded default dataset. :func:`generate` writes ``<out>/dataset/`` exactly as a
downloaded CT-RATE subset lies on disk (``../shared/ctrate-format.md``): the ``train/`` and ``valid/``
trees of int16 ``.nii.gz`` volumes with blank headers and raw scanner values (HU - RescaleIntercept),
a few ``train_fixed/`` / ``valid_fixed/`` re-uploads already in HU, the two labels CSVs, the metadata
CSVs (RescaleIntercept -1024, a few -8192), the reports CSVs, the ``no_chest_*.txt`` lists (a head and
an abdomen phantom per split) and some label rows whose volume was "not downloaded".

Geometry and orientation
    Array axes are (X, Y, Z) as nibabel returns them. X runs from the patient's right (low x) to the
    patient's left (high x); Y from anterior (low y, sternum) to posterior (high y, spine, table);
    Z from caudal (low z, diaphragm and liver) to cranial (high z, lung apices). Transposed to
    (Z, Y, X), ``imshow(volume[z])`` shows an axial slice in radiological convention: anterior at
    the top, the patient's left on the image right. Everything is computed in millimetres in a
    reference frame (352 mm in-plane field of view, 240 mm z coverage) that is mapped onto the
    requested ``shape`` and ``spacing`` (as a scanner fits its field of view to the body), so the
    same seed gives the same patient at 128x128x48 (2.75x2.75x5 mm) or 512x512x200 (0.7x0.7x1.5 mm).
    Small objects are drawn with partial-volume coverage (in-plane box filter, slab sampling in z).

Anatomy (HU, non-contrast)
    Air -1000 outside the body and -3024 outside the circular reconstruction field of view (the
    image corners); the patient table below the back; body ellipse with subcutaneous fat (~-100)
    and chest-wall muscle (~45); thoracic cavity with mediastinal fat (~-80); two lungs (~-860, a
    dependent gradient towards the back) that taper to the apices and end on the
    dome-shaped hemidiaphragms (right higher) with deep posterior recesses; below them the liver,
    stomach (with a gas bubble) and spleen; a pulmonary vessel tree (~+40, branching from the hila,
    running mostly cranio-caudally, tapering) with accompanying air-filled bronchi with thin walls;
    trachea, carina and main bronchi; heart (~40, anterior-left, with an epicardial fat rim);
    ascending aorta, arch, descending aorta, pulmonary trunk and arteries, superior vena cava, arch
    branches, oesophagus; vertebral bodies (cortex ~850, trabecular ~250 falling with age, discs),
    spinal canal and posterior elements; oblique ribs (bright arcs, cartilage anteriorly); sternum.
    Size, position, heart, vessels, airways and ribs vary per patient. Reconstructions differ by
    kernel: a soft one (PSF ~1 mm, noise sd ~10-14 HU) or a sharp one (PSF ~0.5 mm, edge
    enhancement, noise sd ~15-20 HU); noise is in-plane-correlated Gaussian.

Abnormality signatures (keys of :data:`SIGNATURES`; all lesions lie in the central two thirds of
the z range so that a centre crop of the slices keeps them; sizes hold at 5.5 mm pixels and 10 mm
slices). "2D" = recognisable in a single axial slice; "3D" = a single slice is ambiguous and only
the neighbouring slices tell it apart.

- Medical material (2D): metal (2300-3500 HU, bodies above 2900): a pacemaker or ICD generator in
  the left anterior chest wall with leads through the subclavian vein and the superior vena cava
  into the right heart, a port with a catheter into the SVC, or an embolisation coil pack at a hilum.
  Nothing else in any volume reaches 2000 HU.
- Arterial wall calcification (2D): 3-10 bright plaques (450-900 HU, 5-8 mm) on the wall of the
  ascending, arch or descending aorta.
- Cardiomegaly (2D): the heart scaled 1.28-1.45x (cardiothoracic ratio ~0.6 instead of ~0.45),
  pushing the left lung laterally.
- Pericardial effusion (2D): an 8-22 mm rim of fluid (5-18 HU) around the heart, outside the
  epicardial fat line.
- Coronary artery wall calcification (2D): 2-8 very bright spots (600-1200 HU, 5-8 mm) on the heart
  surface along the LAD, circumflex and right coronary grooves.
- Hiatal hernia (2D): a 45-65 mm soft-tissue-walled mass behind the heart just above the
  diaphragm, left of the midline, with gas anteriorly and fluid posteriorly (supine level).
- Lymphadenopathy (3D-leaning): 2-5 enlarged nodes (short axis 16-26 mm, ~40 HU) at paratracheal,
  subcarinal, aortopulmonary, prevascular or hilar stations. In one slice a node is a round
  soft-tissue density in fat like a vessel cross-section; only across slices is it an ovoid rather
  than a tube.
- Emphysema (2D): low-attenuation areas (-970 to -1000 HU, below -950) with upper-zone predominance,
  pruned vessels, sometimes subpleural bullae.
- Atelectasis (2D): dense (15-40 HU) plate-like bands or a pleura-based wedge in the lower lung.
- Lung nodule (3D): 1-3 solid spheres (radius 5.5-9.5 mm, ~40 HU) surrounded by lung, spanning a
  few slices. In any single slice a nodule is a round density identical to the cross-section of a
  vessel of the same calibre; every volume has such vessels (lobar arteries of radius 5-7 mm running
  vertically through many slices) as benign distractors. Only 3D context (sphere vs tube) separates
  them.
- Lung opacity (2D): 1-4 ground-glass patches (-600 to -450 HU) with irregular margins through which
  the vessels remain visible.
- Pulmonary fibrotic sequela (2D): pleuroparenchymal thickening at the pleura (volume loss) with
  3-6 dense linear strands radiating towards the hilum and short reticular lines, usually in an
  upper zone.
- Pleural effusion (2D): a crescent of fluid (5-20 HU) layering along the dependent (posterior)
  chest wall, thickest at the base, uni- or bilateral.
- Mosaic attenuation pattern (2D, diffuse): both lungs divided into lobular regions of ~20 mm that
  are alternately lucent (~-910 HU, thinner vessels) and denser (~-780 HU).
- Peribronchial thickening (2D, subtle): every bronchus has a wall 2.2-3.2 mm thicker than normal
  (thick rings around the airway lumina, most visible near the hila).
- Consolidation (2D): a dense (25-45 HU) pleura-based lobar/segmental region with irregular margins
  that obscures the vessels and shows air bronchograms.
- Bronchiectasis (3D-leaning): 2-4 dilated airways (lumen radius 4.5-7 mm, wall 1.5-2.5 mm, larger
  than the accompanying vessel: signet ring) running 60-100 mm cranio-caudally. The single-slice
  ring is visible in 2D; that it is a tube (not a cyst) is a 3D property.
- Interlobular septal thickening (2D): a polygonal network of thin (2-2.5 mm, ~20 HU) septal lines
  in the peripheral 18-28 mm of the lower and middle lung.

Labels
    Per-class prevalence follows the paper's Table 1 (Total / 3000 patients) exactly in
    expectation: a latent-Gaussian (multivariate probit) model with six shared factors (age,
    vascular, cardiac/fluid, infection, fibrosis/airways, smoking/COPD) whose thresholds are the
    Table 1 quantiles, so that co-occurrences are realistic (arterial with coronary calcification
    and age; pleural effusion with atelectasis, cardiomegaly and pericardial effusion; consolidation
    with opacity; fibrosis with bronchiectasis, septal and peribronchial thickening; emphysema with
    nodules). Labels are per scan: reconstructions share them and the drawn lesions; a repeat scan
    of a patient shares most (latent correlation 0.85) and lesions that persist keep their place.
    The labels CSV states exactly what is drawn; non-chest volumes are all-zero.

Run ``python -m ctlib.synthetic --help`` for the command line.
"""

from ctlib.synthetic.anatomy import _cavity_depth, _heart
from ctlib.synthetic.plan import PREVALENCE, _draw_labels, _plan
from ctlib.synthetic.scanner import _phantom
from ctlib.synthetic.signatures import SIGNATURES, Signature, class_groups, signature_table
from ctlib.synthetic.truth import lesion_masks, lesion_masks_for_model, lesion_table
from ctlib.synthetic.writer import _write_volume, generate, main

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
# private names kept importable from the package for tests and notebooks
_PRIVATE = (_cavity_depth, _heart, _draw_labels, _plan, _phantom, _write_volume)
