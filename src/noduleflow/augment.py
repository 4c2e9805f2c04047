"""Training-time augmentation of 2D patch batches (numpy in, numpy out; one generator per batch).

Arrays: ``image`` (n, c, h, w) float32, already intensity-normalised (:mod:`noduleflow.intensity`);
``mask`` and ``roi`` (n, h, w) 0/1. Pixels are those of the resampled grid (isotropic mm spacing).
Every function draws only from the ``numpy.random.Generator`` it is given, so a batch's
augmentation is a pure function of its seed (:mod:`noduleflow.patchdata`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def augment_batch(image: np.ndarray, mask: np.ndarray, roi: np.ndarray, augment: Mapping[str, Any],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random per-patch augmentation; ``image`` (n, c, h, w) float32 (normalised), ``mask``/``roi``
    (n, h, w) 0/1. Geometry changes are applied to all three alike. Returns new arrays.

    In this order, each off when its setting is off:

    * ``zoom: [low, high]`` with probability ``zoom_p`` per patch (default 1): magnify by a factor
      drawn uniformly from the range (>= 1; [1, 1] = off) around a random centre that keeps the view
      inside the patch (bilinear; mask and roi resampled bilinearly and thresholded at 0.5), so
      nodules are seen larger than they are;
    * ``nodule_contrast: [low, high]`` with probability ``nodule_contrast_p`` per patch that shows a
      nodule: only around the nodule (its mask grown by 2 pixels, every channel), pixels brighter
      than the parenchyma (the patch's median ROI value) have their difference to it scaled by a
      factor drawn from the range, and noise is added back so the faded nodule is as grainy as its
      surroundings: a solid nodule turned into a ground-glass one beside vessels that stay sharp
      (ground-glass nodules are rare in any cohort; this synthesises them from solid ones);
    * ``flips``: flip y and x, each with probability 1/2;
    * ``rot90``: rotate by a random multiple of 90 degrees (square patches);
    * ``contrast: [low, high]``: inside the ROI, scale every pixel's difference from the patch's
      median ROI value (the lung parenchyma) by a factor drawn uniformly from the range ([1, 1] =
      off), so solid nodules are also seen as faint, ground-glass-like ones;
    * ``intensity_jitter: j``: ``x * (1 + a) + b`` with ``a, b`` uniform in ``[-j, j]``.
    """
    n, _, h, w = image.shape
    flips = bool(augment.get("flips", True))
    rot = bool(augment.get("rot90", True)) and h == w
    jitter = float(augment.get("intensity_jitter", 0.0))
    zoom = [float(v) for v in augment.get("zoom", (1.0, 1.0))]
    zoom_p = float(augment.get("zoom_p", 1.0))
    contrast = [float(v) for v in augment.get("contrast", (1.0, 1.0))]
    nodule_contrast = [float(v) for v in augment.get("nodule_contrast", (1.0, 1.0))]
    nodule_contrast_p = float(augment.get("nodule_contrast_p", 0.0))
    draws = rng.random((n, 3))
    turns = (draws[:, 0] * 4).astype(int) if rot else np.zeros(n, dtype=int)
    flip_y = (draws[:, 1] < 0.5) & flips
    flip_x = (draws[:, 2] < 0.5) & flips
    if zoom != [1.0, 1.0] and zoom_p > 0:
        factors, centres = rng.uniform(zoom[0], zoom[1], n), rng.uniform(-1, 1, (n, 2))
        chosen = rng.random(n) < zoom_p
        if chosen.any():
            image, mask, roi = image.copy(), mask.copy(), roi.copy()
            image[chosen], mask[chosen], roi[chosen] = _zoom(image[chosen], mask[chosen], roi[chosen],
                                                             factors[chosen], centres[chosen])
    if nodule_contrast_p > 0 and nodule_contrast != [1.0, 1.0]:
        image = fade_nodules(image, mask, roi, rng.uniform(nodule_contrast[0], nodule_contrast[1], n),
                             rng.random(n) < nodule_contrast_p, rng)
    out_image, out_mask, out_roi = np.empty_like(image), np.empty_like(mask), np.empty_like(roi)
    for i in range(n):
        im, ma, ro = image[i], mask[i], roi[i]
        if flip_y[i]:
            im, ma, ro = im[:, ::-1], ma[::-1], ro[::-1]
        if flip_x[i]:
            im, ma, ro = im[:, :, ::-1], ma[:, ::-1], ro[:, ::-1]
        if turns[i]:
            im, ma, ro = (np.rot90(im, turns[i], axes=(1, 2)), np.rot90(ma, turns[i]), np.rot90(ro, turns[i]))
        out_image[i], out_mask[i], out_roi[i] = im, ma, ro
    if contrast != [1.0, 1.0]:
        factors = rng.uniform(contrast[0], contrast[1], n).astype(np.float32)
        inside = out_roi > 0
        has_roi = inside.reshape(n, -1).any(axis=1)
        ref = parenchyma_reference(out_image, out_roi)[:, None, None, None]
        scaled = ref + (out_image - ref) * factors[:, None, None, None]
        out_image = np.where(inside[:, None] & has_roi[:, None, None, None], scaled, out_image)
    if jitter > 0:
        scale = 1.0 + rng.uniform(-jitter, jitter, n).astype(np.float32)
        shift = rng.uniform(-jitter, jitter, n).astype(np.float32)
        out_image = out_image * scale[:, None, None, None] + shift[:, None, None, None]
    return out_image.astype(np.float32, copy=False), out_mask, out_roi


def parenchyma_reference(image: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Per patch, the median of the centre channel of ``image`` (n, c, h, w) inside ``roi`` (n, h, w):
    the lung parenchyma, the level the contrast augmentations scale around. (n,) float32; a patch
    without ROI pixels gets the median of its whole centre channel."""
    n = len(image)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    inside = roi > 0
    has_roi = inside.reshape(n, -1).any(axis=1)
    centre = np.where(inside | ~has_roi[:, None, None], image[:, image.shape[1] // 2], np.nan)
    return np.nanmedian(centre.reshape(n, -1), axis=1).astype(np.float32)


def fade_nodules(image: np.ndarray, mask: np.ndarray, roi: np.ndarray, factors: np.ndarray,
                 chosen: np.ndarray, rng: np.random.Generator, grow_px: int = 2) -> np.ndarray:
    """Fade the nodules of the ``chosen`` patches: ``image`` (n, c, h, w) float32 (normalised),
    ``mask``/``roi`` (n, h, w); in patch i, around its nodule (mask grown by ``grow_px`` pixels, every
    channel) and inside the ROI, each pixel brighter than the parenchyma ``ref``
    (:func:`parenchyma_reference`) becomes ``ref + factors[i] * (value - ref)`` plus noise of
    ``sigma * sqrt(1 - factors[i]**2)``, so the faded nodule keeps the grain of its surroundings:
    ``sigma`` is the parenchyma's noise (scaled MAD of the ROI's centre channel outside that
    neighbourhood) and the noise is as correlated as the parenchyma's (:func:`parenchyma_noise`): CT
    noise is smooth over about a pixel, and a faded nodule with white noise on it would teach the
    model a texture no real ground-glass nodule has. Patches without nodule pixels or ROI pixels, or
    not chosen, are returned unchanged. Returns a new array."""
    from scipy import ndimage

    out = image.copy()
    middle = image.shape[1] // 2
    grow = ndimage.generate_binary_structure(2, 1)
    shows = lambda a: a.reshape(len(a), -1).any(axis=1)  # noqa: E731
    faded_patches = np.flatnonzero(chosen & shows(mask) & shows(roi))
    refs = parenchyma_reference(image[faded_patches], roi[faded_patches])
    for i, ref in zip(faded_patches, refs.tolist()):
        inside = roi[i] > 0
        region = ndimage.binary_dilation(mask[i] > 0, grow, iterations=grow_px) & inside
        parenchyma = inside & ~region
        sigma, smoothing_px = parenchyma_noise(image[i, middle],
                                               parenchyma if parenchyma.sum() >= 64 else inside, ref)
        f = float(factors[i])
        noise = correlated_noise(rng, image.shape[1:], smoothing_px)[:, region]
        block = out[i][:, region]
        bright = block > ref
        faded = ref + f * (block - ref) + sigma * math.sqrt(max(0.0, 1.0 - f * f)) * noise
        out[i][:, region] = np.where(bright, faded, block).astype(np.float32)
    return out


def parenchyma_noise(centre: np.ndarray, inside: np.ndarray, ref: float) -> tuple[float, float]:
    """Noise of the parenchyma in one patch's centre channel ``centre`` (h, w) inside ``inside``
    (h, w bool) around its level ``ref``: ``(sigma, smoothing_px)``. ``sigma`` is the scaled MAD of
    the values; the correlation of neighbouring pixels ``rho = 1 - var(x - x') / (2 var(x))`` (x' the
    right-hand neighbour, variances from scaled MADs, so vessels do not count) gives the width in
    pixels of the Gaussian that makes white noise as correlated: ``rho = exp(-1 / (4 s**2))``
    (``rho`` clipped to [0.05, 0.95]; ~0.8 px on resampled CT)."""
    values = centre[inside]
    if values.size == 0:
        return 0.0, 0.0
    sigma = 1.4826 * float(np.median(np.abs(values - ref)))
    pairs = inside[:, 1:] & inside[:, :-1]
    if sigma <= 0 or pairs.sum() < 16:
        return sigma, 0.0
    diff = (centre[:, 1:] - centre[:, :-1])[pairs]
    sigma_diff = 1.4826 * float(np.median(np.abs(diff - np.median(diff))))
    rho = float(np.clip(1.0 - sigma_diff ** 2 / (2.0 * sigma ** 2), 0.05, 0.95))
    return sigma, math.sqrt(-1.0 / (4.0 * math.log(rho)))


def correlated_noise(rng: np.random.Generator, shape: Sequence[int], smoothing_px: float) -> np.ndarray:
    """Gaussian noise of unit variance, shape ``(c, h, w)``, each channel smoothed in-plane by a
    Gaussian of ``smoothing_px`` pixels (0 = white) and rescaled to unit variance exactly (the
    variance of smoothed white noise is the sum of the squared kernel weights)."""
    from scipy import ndimage

    white = rng.standard_normal(tuple(shape)).astype(np.float32)
    if smoothing_px <= 0:
        return white
    smooth = ndimage.gaussian_filter(white, (0, smoothing_px, smoothing_px), mode="reflect")
    delta = np.zeros(int(8 * smoothing_px) * 2 + 1)
    delta[len(delta) // 2] = 1.0
    weights = ndimage.gaussian_filter1d(delta, smoothing_px)
    return smooth / np.float32(np.sum(weights ** 2))  # 2-D variance (sum w^2)^2: divide by its root


def _zoom(image: np.ndarray, mask: np.ndarray, roi: np.ndarray, factors: np.ndarray,
          centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Magnify patch i by ``factors[i]`` (>= 1) about a centre at ``centres[i]`` (y, x in [-1, 1],
    scaled so the view stays inside the patch); one batched bilinear resampling."""
    import torch.nn.functional as F

    n = len(image)
    scale = 1.0 / np.maximum(factors, 1.0)
    theta = np.zeros((n, 2, 3), np.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 0, 2] = centres[:, 1] * (1.0 - scale)  # x
    theta[:, 1, 2] = centres[:, 0] * (1.0 - scale)  # y
    stacked = torch.from_numpy(np.concatenate([image, mask[:, None].astype(np.float32),
                                               roi[:, None].astype(np.float32)], axis=1))
    grid = F.affine_grid(torch.from_numpy(theta), list(stacked.shape), align_corners=False)
    out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="border", align_corners=False).numpy()
    c = image.shape[1]
    return (np.ascontiguousarray(out[:, :c]), (out[:, c] > 0.5).astype(mask.dtype),
            (out[:, c + 1] > 0.5).astype(roi.dtype))
