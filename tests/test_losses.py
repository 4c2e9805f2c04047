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


def _nodules_2_percent():
    """(8, 1, 32, 32) targets: a disc of ~5 % of the pixels in every other patch, ~2 % overall,
    about the nodule share of the default cohort's patches."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    targets = torch.zeros(8, 1, 32, 32)
    for i in range(0, 8, 2):
        targets[i, 0] = (((yy - 10 - i) ** 2 + (xx - 16) ** 2) <= 16).float()
    return targets


def test_the_all_not_nodule_answer_is_cheap_under_the_plain_dice_of_complementary_labels_but_not_dice_both():
    """Why complementary labels collapse with the plain (batch or per-patch) Dice: the target "not
    nodule" covers ~98 % of the pixels, so answering "not nodule" everywhere already scores a loss
    near 0.01. dice_both also scores the nodule map 1 - output, so that answer costs ~0.5."""
    nodule = _nodules_2_percent()
    assert 0.01 < float(nodule.mean()) < 0.03
    complement = 1 - nodule
    everywhere = torch.full_like(complement, 20.0)  # sigmoid = 1: "not nodule" everywhere
    perfect = (2 * complement - 1) * 20
    assert float(make_loss("dice")(everywhere, complement)) < 0.02
    assert float(make_loss("dice_patch")(everywhere, complement)) < 0.03
    assert float(make_loss("dice_both")(everywhere, complement)) > 0.45
    for name in ("dice", "dice_patch", "dice_both"):
        assert float(make_loss(name)(perfect, complement)) < 1e-3
    # the positive labels' Dice charges the all-background answer fully, as dice_both does
    assert float(make_loss("dice")(-everywhere, nodule)) > 0.9


def test_dice_both_of_complementary_labels_is_that_of_positive_labels_with_the_output_flipped():
    g = torch.Generator().manual_seed(1)
    nodule = _nodules_2_percent()
    logits = torch.randn(nodule.shape, generator=g) * 3
    weight = (torch.rand(8, 32, 32, generator=g) < 0.8).float()
    # nodule probability 1 - sigmoid(z) = sigmoid(-z): the same task seen from the other side
    complementary = make_loss("dice_both")(logits, (1 - nodule) * weight[:, None], weight)
    positive = make_loss("dice_both")(-logits, nodule, weight)
    assert torch.allclose(complementary, positive, atol=1e-6)
    # the plain batch Dice is not symmetric: it is the positive task only for positive labels
    assert not torch.allclose(make_loss("dice")(logits, 1 - nodule, weight), make_loss("dice")(-logits, nodule, weight))


def test_dice_patch_counts_every_patch_alike():
    """Per-patch Dice: a small nodule missed in one patch costs as much as a large one missed in
    another, whereas the batch Dice weighs them by their pixels."""
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    targets = torch.zeros(2, 1, 32, 32)
    targets[0, 0] = (((yy - 16) ** 2 + (xx - 16) ** 2) <= 100).float()   # large, found
    targets[1, 0] = (((yy - 16) ** 2 + (xx - 16) ** 2) <= 4).float()     # small, missed
    logits = torch.full_like(targets, -20.0)
    logits[0] = (2 * targets[0] - 1) * 20
    assert float(make_loss("dice")(logits, targets)) < 0.1
    assert float(make_loss("dice_patch")(logits, targets)) == pytest.approx(0.5, abs=0.05)


def _discs(radii_px: tuple[float, ...], size: int = 32) -> torch.Tensor:
    """One patch per radius with a centred disc of that radius (0 = an empty patch): (n, 1, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r2 = ((yy - size // 2) ** 2 + (xx - size // 2) ** 2).float()
    return torch.stack([(r2 <= r * r).float() if r > 0 else torch.zeros(size, size) for r in radii_px])[:, None]


def test_dice_patch_bce_charges_a_missed_small_nodule_like_a_missed_large_one():
    """A batch with a large and a small nodule patch: under dice_bce missing the small one costs a
    fraction of missing the large one (its pixels are few); under dice_patch_bce the Dice part of
    the two mistakes is the same, so small nodules are not outweighed by large ones."""
    targets = _discs((10, 2))
    right = (2 * targets - 1) * 20

    def cost_of_missing(name: str, patch: int) -> float:
        wrong = right.clone()
        wrong[patch] = -20.0  # nothing predicted in that patch
        loss = make_loss(name)
        return float(loss(wrong, targets)) - float(loss(right, targets))

    assert cost_of_missing("dice_bce", 1) < 0.25 * cost_of_missing("dice_bce", 0)
    dice_part = {patch: cost_of_missing("dice_patch_bce", patch) - cost_of_missing("bce", patch) for patch in (0, 1)}
    assert dice_part[1] == pytest.approx(dice_part[0], abs=0.1)
    assert dice_part[1] > 0.3


def test_dice_patch_bce_leaves_patches_without_nodule_to_the_cross_entropy():
    """Empty patches add no Dice term: a batch of them scores exactly the BCE, and a few doubtful
    pixels in an empty patch beside a nodule patch cost no more than under the BCE alone."""
    empty = _discs((0, 0))
    logits = torch.randn(empty.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(make_loss("dice_patch_bce")(logits, empty), make_loss("bce")(logits, empty))
    targets = _discs((6, 0))
    right = (2 * targets - 1) * 20
    doubtful = right.clone()
    doubtful[1, 0, 10:12, 10:12] = 20.0  # four false pixels in the empty patch
    extra = {name: float(make_loss(name)(doubtful, targets)) - float(make_loss(name)(right, targets))
             for name in ("dice_patch_bce", "bce", "dice_patch")}
    assert extra["dice_patch_bce"] == pytest.approx(extra["bce"], rel=1e-4)
    assert extra["dice_patch"] > 10 * extra["dice_patch_bce"]


def test_dice_mixed_bce_charges_false_pixels_in_empty_patches_that_dice_patch_bce_leaves_alone():
    """False pixels in a patch without a nodule: dice_patch_bce charges them only the cross-entropy,
    dice_mixed_bce also half a batch Dice, so a model cannot buy small-nodule recall with false
    pixels elsewhere for free. A missed small nodule still costs it over a third of what a missed large
    one costs (the Dice parts; dice_bce: a few per cent)."""
    targets = _discs((6, 0))
    right = (2 * targets - 1) * 20
    noisy = right.clone()
    noisy[1, 0, 5:25, 5:25] = 20.0  # 400 false pixels in the empty patch
    extra = {name: float(make_loss(name)(noisy, targets)) - float(make_loss(name)(right, targets))
             for name in ("dice_mixed_bce", "dice_patch_bce", "bce", "dice")}
    assert extra["dice_patch_bce"] == pytest.approx(extra["bce"], rel=1e-4)
    assert extra["dice_mixed_bce"] - extra["bce"] == pytest.approx(0.5 * extra["dice"], rel=1e-3)
    assert extra["dice_mixed_bce"] - extra["dice_patch_bce"] > 0.2  # the batch Dice's half of ~0.45

    sizes = _discs((10, 2))
    exact = (2 * sizes - 1) * 20

    def cost_of_missing(name: str, patch: int) -> float:
        wrong = exact.clone()
        wrong[patch] = -20.0
        return float(make_loss(name)(wrong, sizes)) - float(make_loss(name)(exact, sizes))

    def dice_part(name: str, patch: int) -> float:
        return cost_of_missing(name, patch) - cost_of_missing("bce", patch)

    ratio = {name: dice_part(name, 1) / dice_part(name, 0) for name in ("dice_mixed_bce", "dice_bce")}
    assert ratio["dice_mixed_bce"] > 0.3
    assert ratio["dice_bce"] < 0.1
