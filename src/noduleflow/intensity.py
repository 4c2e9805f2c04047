"""Intensity handling shared by training and inference: lung ROI and HU normalisation.

The same functions run when patches are sampled / trained on and when whole slices are predicted,
so the network sees the same input distribution in both places:

1. :func:`apply_roi` — with ``preprocess.lung_roi`` true, every pixel outside the lung mask becomes
   air (-1000 HU), at sampling time (``patches.h5`` stores the masked HU) and at inference. With
   ``sampling.roi_margin_mm`` > 0 the image is kept in a band that wide around the lung
   (:func:`visible_region`): the network sees what a structure at the lung's edge is attached to
   (chest wall, mediastinum) while the loss and the candidates stay inside the lung;
2. :func:`normalize_hu` — HU clipped to ``train.intensity.window_hu`` and scaled to [0, 1];
3. :func:`with_lung_channel` — with ``train.intensity.lung_channel`` true, the lung mask of the
   centre slice is one more input channel (1 inside the lung, 0 outside), so a model that sees
   the image around the lung (``sampling.roi_margin_mm``) still knows where the lung ends.

:func:`normalize_intensity` dispatches on an ``intensity`` block (as stored in ``model.pt``): the
HU window (default), or ``mode: ct`` — nnU-Net's CT scheme (clip to the 0.5/99.5 percentiles of
foreground HU, then subtract the mean and divide by the standard deviation of those voxels; the
statistics come from the training data, :func:`ct_statistics`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

#: HU of air: what apply_roi writes outside the ROI and what pads patches and slices, at sampling
#: and at inference alike
AIR_HU = -1000
#: without a lung ROI, a voxel above this HU is body: the region negatives are drawn from (with the
#: lung) and the region inference runs over
BODY_MIN_HU = -500


def visible_region(lung: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float) -> np.ndarray:
    """Bool mask of what the network sees with a lung ROI: the lung mask ``lung`` (any dtype,
    nonzero = lung, (z, y, x) or any axis order matching ``spacing_zyx``) grown by ``margin_mm`` (mm,
    Euclidean distance with the voxel spacing ``spacing_zyx`` in mm, same axis order). ``margin_mm``
    0 gives the lung mask itself. The same call runs at sampling and at inference, so both see the
    same band (``sampling.roi_margin_mm``, stored in the model)."""
    inside = np.asarray(lung) > 0
    margin = float(margin_mm)
    if margin < 0:
        raise ValueError(f"roi margin {margin_mm} mm: must be >= 0")
    if margin == 0 or not inside.any():
        return inside
    from scipy import ndimage

    spacing = np.asarray(spacing_zyx, dtype=float)
    if spacing.shape != (inside.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"spacing {list(spacing_zyx)} must give {inside.ndim} positive voxel sizes (mm)")
    # only the band can change: work on the lung's bounding box grown by the margin
    reach = np.ceil(margin / spacing).astype(int)
    nonzero = np.nonzero(inside)
    lo = [max(0, int(ix.min()) - r) for ix, r in zip(nonzero, reach)]
    hi = [min(n, int(ix.max()) + 1 + r) for ix, n, r in zip(nonzero, inside.shape, reach)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros(inside.shape, dtype=bool)
    distance = ndimage.distance_transform_edt(~inside[box], sampling=spacing)
    out[box] = distance <= margin
    return out


def apply_roi(image_hu: np.ndarray, roi: np.ndarray, fill_hu: int = AIR_HU) -> np.ndarray:
    """Set every voxel outside ``roi`` (nonzero = inside) to ``fill_hu``; any shape, int16 out.

    ``roi`` must broadcast against ``image_hu`` (e.g. a (h, w) mask for (c, h, w) context channels,
    or (n, 1, h, w) for (n, c, h, w) patches). Float input is rounded and clipped to int16.
    """
    image = np.asarray(image_hu)
    inside = np.asarray(roi).astype(bool, copy=False)
    try:
        np.broadcast_shapes(inside.shape, image.shape)
    except ValueError as exc:
        raise ValueError(f"roi shape {inside.shape} does not broadcast against image shape {image.shape}") from exc
    if image.dtype != np.int16:
        image = np.clip(np.rint(image) if image.dtype.kind == "f" else image, -32768, 32767).astype(np.int16)
    return np.where(inside, image, np.int16(fill_hu)).astype(np.int16, copy=False)


def normalize_hu(image_hu: np.ndarray, window_hu: Sequence[float]) -> np.ndarray:
    """Clip HU to ``window_hu = [low, high]`` and scale linearly to [0, 1]; float32, same shape."""
    low, high = float(window_hu[0]), float(window_hu[1])
    if not high > low:
        raise ValueError(f"window_hu {list(window_hu)} must be [low, high] with low < high")
    image = np.asarray(image_hu, dtype=np.float32)
    return ((np.clip(image, low, high) - low) / (high - low)).astype(np.float32, copy=False)


def ct_statistics(values_hu: np.ndarray) -> dict:
    """nnU-Net-style CT statistics of foreground HU values (e.g. the nodule pixels of the training
    patches): ``clip_hu`` = [0.5th, 99.5th percentile], and ``mean``/``std`` of the clipped values.
    Plain floats, ready to store in the ``intensity`` block of a model."""
    values = np.asarray(values_hu, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("ct_statistics: no foreground values")
    low, high = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, low, high)
    return {"mode": "ct", "clip_hu": [float(low), float(high)], "mean": float(clipped.mean()),
            "std": float(clipped.std())}


def normalize_ct(image_hu: np.ndarray, clip_hu: Sequence[float], mean: float, std: float) -> np.ndarray:
    """nnU-Net CT normalisation: clip HU to ``clip_hu``, subtract ``mean``, divide by ``std``; float32."""
    low, high = float(clip_hu[0]), float(clip_hu[1])
    if not high >= low:
        raise ValueError(f"clip_hu {list(clip_hu)} must be [low, high] with low <= high")
    image = np.clip(np.asarray(image_hu, dtype=np.float32), low, high)
    return ((image - np.float32(mean)) / np.float32(max(float(std), 1e-8))).astype(np.float32, copy=False)


def input_channels(image_channels: int, intensity: Mapping) -> int:
    """Channels of the network's input: the ``image_channels`` context slices, plus one for the
    lung mask when the ``intensity`` block says ``lung_channel``."""
    return int(image_channels) + (1 if intensity.get("lung_channel", False) else 0)


def with_lung_channel(image: np.ndarray, lung: np.ndarray, intensity: Mapping) -> np.ndarray:
    """``image`` (n, c, h, w) float32 (normalised) with the lung mask ``lung`` (n, h, w; nonzero =
    lung) appended as channel c (1.0 / 0.0) when ``intensity["lung_channel"]``; else ``image``."""
    if not intensity.get("lung_channel", False):
        return image
    mask = (np.asarray(lung) > 0).astype(image.dtype)[:, None]
    return np.concatenate([image, mask], axis=1)


def normalize_intensity(image_hu: np.ndarray, intensity: Mapping) -> np.ndarray:
    """Normalise HU as an ``intensity`` block says: ``{"window_hu": [low, high]}`` (mode ``window``,
    the default) -> :func:`normalize_hu`; ``{"mode": "ct", "clip_hu", "mean", "std"}`` ->
    :func:`normalize_ct`."""
    mode = intensity.get("mode", "window")
    if mode == "window":
        return normalize_hu(image_hu, intensity.get("window_hu", (-1000, 400)))
    if mode == "ct":
        missing = [k for k in ("clip_hu", "mean", "std") if k not in intensity]
        if missing:
            raise ValueError(f"intensity mode 'ct' needs {', '.join(missing)}")
        return normalize_ct(image_hu, intensity["clip_hu"], intensity["mean"], intensity["std"])
    raise ValueError(f"unknown intensity mode {mode!r} (window | ct)")
