"""Segmentation losses on logits, restricted to the region the model sees.

Every loss takes ``logits`` and ``targets`` of shape (n, C, h, w) (targets 0/1 floats, see
:func:`noduleflow.model.build_targets`) and an optional ``weight`` of shape (n, h, w) or
(n, 1, h, w): 1 where a pixel counts (the patch's ``roi``), 0 where it is ignored. Pixels outside
the ROI therefore never contribute, whatever the label mode. Losses are computed in float32 (also
under mixed precision) and return a scalar tensor; every channel counts equally.

* ``dice``: soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per channel, summed
  over the whole batch ("batch Dice", stable when a patch has no nodule), ``s = 1``;
* ``dice_patch``: the same soft Dice computed per patch (sums over one patch's pixels), mean over
  patches and channels;
* ``dice_both``: the mean of two batch Dice losses per channel, one of the target and one of its
  complement inside the ROI (``1 - p`` against ``1 - t``), as a two-class Dice with its background
  class. With complementary labels (target "not nodule", covering ~98 % of the ROI) the plain
  ``dice`` loss of the all-"not nodule" answer is already ~0.01, and it charges a missed nodule
  pixel and a false one alike, like pixel accuracy: the network is never pushed to carve out
  the nodules. The second term is the Dice of the nodule map ``1 - output`` against the pixels the
  complementary label leaves out, so that answer costs ~0.5;
* ``bce``: binary cross-entropy, target-1 pixels weighted by ``pos_weight``, mean over counted pixels;
* ``focal``: ``(1 - p_t) ** gamma`` times the cross-entropy (Lin et al. 2017), mean over counted pixels;
* ``dice_bce`` (the default): ``dice + bce``;
* ``dice_patch_bce``: the soft Dice of each patch that shows target pixels inside the ROI, mean over
  those patches and channels, plus ``bce`` over every pixel. A batch Dice sums pixels, so a 25 mm
  nodule (~500 pixels per slice at 1 mm) outweighs a 7 mm one (~40) about twelve to one, and a
  missed small nodule barely moves the loss; here every nodule patch counts alike. Patches without
  target pixels are left to the cross-entropy (a per-patch Dice would charge them a near-total loss
  for a handful of doubtful pixels, which is what ``dice_patch`` does).
* ``dice_mixed_bce``: the mean of the batch ``dice`` and the per-patch Dice of ``dice_patch_bce``,
  plus ``bce``. The per-patch term gives every nodule patch the same weight; the batch term charges
  false pixels wherever they are, in patches without a nodule too, which ``dice_patch_bce`` leaves
  to the cross-entropy alone (its models mark many false pixels: a lower pixel Dice).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("dice_bce", "dice", "dice_patch", "dice_both", "dice_patch_bce", "dice_mixed_bce", "focal",
          "bce")

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _prepare(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None):
    if logits.shape != targets.shape or logits.ndim != 4:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (n, C, h, w)")
    logits = logits.float()
    targets = targets.float()
    if weight is None:
        weight = torch.ones_like(targets[:, :1])
    else:
        weight = weight.float()
        if weight.ndim == 3:
            weight = weight[:, None]
    return logits, targets, weight.expand_as(targets)


def _soft_dice(prob: torch.Tensor, targets: torch.Tensor, dims: tuple[int, ...], smooth: float) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with the sums over ``dims`` (not reduced further)."""
    intersection = (prob * targets).sum(dims)
    denominator = prob.sum(dims) + targets.sum(dims)
    return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft batch Dice loss (0 = perfect), mean over channels."""
    logits, targets, weight = _prepare(logits, targets, weight)
    return _soft_dice(torch.sigmoid(logits) * weight, targets * weight, (0, 2, 3), smooth).mean()


def patch_dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                    smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of each patch and channel (0 = perfect), mean over patches and channels; a
    patch whose target and prediction are both empty scores ~0."""
    logits, targets, weight = _prepare(logits, targets, weight)
    return _soft_dice(torch.sigmoid(logits) * weight, targets * weight, (2, 3), smooth).mean()


def both_dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                   smooth: float = 1.0) -> torch.Tensor:
    """Mean of the soft batch Dice loss of the target and of its complement inside the ROI (``1 - p``
    against ``1 - t``, both times ``weight``), mean over channels (0 = perfect)."""
    logits, targets, weight = _prepare(logits, targets, weight)
    prob = torch.sigmoid(logits)
    dims = (0, 2, 3)
    target_term = _soft_dice(prob * weight, targets * weight, dims, smooth)
    complement_term = _soft_dice((1.0 - prob) * weight, (1.0 - targets) * weight, dims, smooth)
    return (0.5 * (target_term + complement_term)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
             pos_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy with target-1 pixels weighted ``pos_weight``; mean over counted pixels."""
    logits, targets, weight = _prepare(logits, targets, weight)
    pixel = F.binary_cross_entropy_with_logits(
        logits, targets, reduction="none",
        pos_weight=torch.tensor(float(pos_weight), device=logits.device))
    return (pixel * weight).sum() / weight.sum().clamp_min(1.0)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
               gamma: float = 2.0) -> torch.Tensor:
    """Focal loss: cross-entropy scaled by ``(1 - p_t) ** gamma``; mean over counted pixels."""
    logits, targets, weight = _prepare(logits, targets, weight)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-ce)
    pixel = (1.0 - p_t) ** gamma * ce
    return (pixel * weight).sum() / weight.sum().clamp_min(1.0)


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                  pos_weight: float = 1.0) -> torch.Tensor:
    """Soft batch Dice loss plus binary cross-entropy (``pos_weight`` applies to the BCE term)."""
    return dice_loss(logits, targets, weight) + bce_loss(logits, targets, weight, pos_weight)


def target_patch_dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                           smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of each (patch, channel) whose target has pixels inside the ROI, mean over
    those (0 = perfect); 0 when no patch of the batch has any (the loss then carries no gradient)."""
    logits, targets, weight = _prepare(logits, targets, weight)
    masked_targets = targets * weight
    per_patch = _soft_dice(torch.sigmoid(logits) * weight, masked_targets, (2, 3), smooth)
    shows_target = masked_targets.sum((2, 3)) > 0
    if not bool(shows_target.any()):
        return per_patch.sum() * 0.0
    return per_patch[shows_target].mean()


def dice_patch_bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                        pos_weight: float = 1.0) -> torch.Tensor:
    """Per-patch soft Dice of the patches that show the target plus binary cross-entropy over every
    counted pixel (``pos_weight`` applies to the BCE term)."""
    return target_patch_dice_loss(logits, targets, weight) + bce_loss(logits, targets, weight, pos_weight)


def dice_mixed_bce_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                        pos_weight: float = 1.0) -> torch.Tensor:
    """Mean of the soft batch Dice and the per-patch Dice of the patches that show the target, plus
    binary cross-entropy over every counted pixel (``pos_weight`` applies to the BCE term)."""
    dice_part = 0.5 * (dice_loss(logits, targets, weight) + target_patch_dice_loss(logits, targets, weight))
    return dice_part + bce_loss(logits, targets, weight, pos_weight)


def make_loss(name: str, pos_weight: float = 1.0, focal_gamma: float = 2.0) -> LossFn:
    """The loss ``name`` (one of :data:`LOSSES`) as ``fn(logits, targets, weight=None) -> scalar``."""
    if name == "dice_bce":
        return lambda logits, targets, weight=None: dice_bce_loss(logits, targets, weight, pos_weight)
    if name == "dice":
        return lambda logits, targets, weight=None: dice_loss(logits, targets, weight)
    if name == "dice_patch":
        return lambda logits, targets, weight=None: patch_dice_loss(logits, targets, weight)
    if name == "dice_both":
        return lambda logits, targets, weight=None: both_dice_loss(logits, targets, weight)
    if name == "dice_patch_bce":
        return lambda logits, targets, weight=None: dice_patch_bce_loss(logits, targets, weight, pos_weight)
    if name == "dice_mixed_bce":
        return lambda logits, targets, weight=None: dice_mixed_bce_loss(logits, targets, weight, pos_weight)
    if name == "bce":
        return lambda logits, targets, weight=None: bce_loss(logits, targets, weight, pos_weight)
    if name == "focal":
        return lambda logits, targets, weight=None: focal_loss(logits, targets, weight, focal_gamma)
    raise ValueError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
