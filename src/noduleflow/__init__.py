"""noduleflow: lung nodule detection and segmentation in chest CT with a 2D U-Net.

Every stage of the Snakemake workflow is a plain function in one module of this package:
``synthetic`` (cohort), ``io`` (files, world <-> voxel), ``preprocess`` (resampling),
``lungmask``, ``slices`` (HDF5 slice stores), ``folds``, ``sampling`` (balanced patches),
``model`` (2D U-Net), ``train``, ``predict``, ``froc`` (LUNA16 evaluation), ``segmetrics``,
``evaluate``, ``report`` and ``experiments``.

Conventions: world coordinates are millimetres in ITK/LUNA16 order (x, y, z); arrays are
numpy (z, y, x). Conversions between the two live in :mod:`noduleflow.io` only.
"""

__version__ = "0.1.0"
