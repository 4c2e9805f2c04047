"""Segmentation losses on logits, restricted to the region the model sees.

Every loss takes ``logits`` and ``targets`` of shape (n, C, h, w) (targets 0/1 floats, see
:func:`noduleflow.model.build_targets`) and an optional ``weight`` of shape (n, h, w) or
(n, 1, h, w): 1 where a pixel counts (the patch's ``roi``), 0 where it is ignored. Pixels outside
the ROI therefore never contribute, whatever the label mode. Losses are computed in float32 (also
under mixed precision) and return a scalar tensor; every channel counts equally.

* ``dice``: soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per channel, summed
  over the whole batch ("batch Dice", stable when a patch has no nodule), ``s = 1``;
* ``bce``: binary cross-entropy, target-1 pixels weighted by ``pos_weight``, mean over counted pixels;
* ``focal``: ``(1 - p_t) ** gamma`` times the cross-entropy (Lin et al. 2017), mean over counted pixels;
* ``dice_bce`` (the default): ``dice + bce``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("dice_bce", "dice", "focal", "bce")

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


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
              smooth: float = 1.0) -> torch.Tensor:
    """Soft batch Dice loss (0 = perfect), mean over channels."""
    logits, targets, weight = _prepare(logits, targets, weight)
    prob = torch.sigmoid(logits) * weight
    targets = targets * weight
    dims = (0, 2, 3)
    intersection = (prob * targets).sum(dims)
    denominator = prob.sum(dims) + targets.sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


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


def make_loss(name: str, pos_weight: float = 1.0, focal_gamma: float = 2.0) -> LossFn:
    """The loss ``name`` (one of :data:`LOSSES`) as ``fn(logits, targets, weight=None) -> scalar``."""
    if name == "dice_bce":
        return lambda logits, targets, weight=None: dice_bce_loss(logits, targets, weight, pos_weight)
    if name == "dice":
        return lambda logits, targets, weight=None: dice_loss(logits, targets, weight)
    if name == "bce":
        return lambda logits, targets, weight=None: bce_loss(logits, targets, weight, pos_weight)
    if name == "focal":
        return lambda logits, targets, weight=None: focal_loss(logits, targets, weight, focal_gamma)
    raise ValueError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
