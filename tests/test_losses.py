"""Losses: each one falls when the prediction improves, and only the ROI counts."""

from __future__ import annotations

import pytest
import torch

from noduleflow.losses import LOSSES, make_loss


def _targets():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(4, 1, 16, 16, generator=g) < 0.1).float()


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_decreases_as_the_prediction_improves(name):
    targets = _targets()
    loss = make_loss(name, pos_weight=3.0, focal_gamma=2.0)
    values = []
    for confidence in (0.0, 0.5, 1.0, 2.0, 4.0):
        logits = (2 * targets - 1) * confidence  # 0 = coin flip, larger = more right
        values.append(float(loss(logits, targets)))
    assert all(a > b for a, b in zip(values, values[1:])), values
    wrong = float(loss(-(2 * targets - 1) * 4.0, targets))
    assert wrong > values[0]


@pytest.mark.parametrize("name", LOSSES)
def test_pixels_outside_the_roi_do_not_count(name):
    targets = _targets()
    weight = torch.zeros(4, 16, 16)
    weight[:, 4:12, 4:12] = 1
    loss = make_loss(name)
    good = (2 * targets - 1) * 4.0
    spoiled = good.clone()
    spoiled[:, :, :4] = -good[:, :, :4]  # wrong everywhere outside the ROI rows
    assert torch.allclose(loss(good, targets, weight), loss(spoiled, targets, weight))
    assert float(loss(spoiled, targets)) > float(loss(good, targets))


def test_dice_loss_is_near_zero_for_a_perfect_prediction_and_near_one_for_none():
    targets = _targets()
    dice = make_loss("dice")
    assert float(dice((2 * targets - 1) * 20, targets)) < 1e-3
    assert float(dice(torch.full_like(targets, -20.0), targets)) > 0.9


def test_pos_weight_makes_missed_nodule_pixels_cost_more():
    targets = _targets()
    missed = torch.full_like(targets, -2.0)
    assert float(make_loss("bce", pos_weight=5.0)(missed, targets)) > float(make_loss("bce")(missed, targets))


def test_losses_handle_two_channels_and_reject_mismatched_shapes():
    targets = torch.cat([_targets(), 1 - _targets()], dim=1)
    assert make_loss("dice_bce")(torch.zeros_like(targets), targets).ndim == 0
    with pytest.raises(ValueError):
        make_loss("dice")(torch.zeros(4, 2, 16, 16), torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError):
        make_loss("hinge")
