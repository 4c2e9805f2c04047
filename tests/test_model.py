"""The 2D U-Net, its targets per label mode, and the nodule probability a trained model gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noduleflow.io import InputError
from noduleflow.model import UNet2d, build_targets, load_model, nodule_probability, out_channels_for


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("in_channels, out_channels", [(1, 1), (3, 1), (5, 2)])
def test_unet_keeps_the_patch_size_and_gives_one_logit_per_output_channel(depth, in_channels, out_channels):
    model = UNet2d(in_channels, out_channels, depth=depth, base_filters=4).eval()
    size = 2 ** depth * 3  # any multiple of 2**depth works, not only powers of two
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, size, 2 * size))
    assert out.shape == (2, out_channels, size, 2 * size)


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_unet_norms_and_dropout_build_and_run(norm):
    model = UNet2d(3, 1, depth=2, base_filters=4, norm=norm, dropout=0.2).eval()
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 1, 16, 16)


def test_unet_rejects_a_size_not_divisible_by_two_to_the_depth():
    with pytest.raises(ValueError, match="divisible"):
        UNet2d(1, depth=3, base_filters=2)(torch.rand(1, 1, 20, 20))


def test_unet_widths_double_per_level():
    model = UNet2d(3, depth=3, base_filters=16)
    widths = [block[0].out_channels for block in model.encoders]
    assert widths == [16, 32, 64, 128]


def _centre_receptive_radius(depth: int, size: int = 128) -> int:
    """How far (px, Chebyshev) from the centre an input pixel can move the centre pixel's logit: the
    extent of the nonzero gradient of that logit with respect to the input."""
    torch.manual_seed(0)
    model = UNet2d(1, depth=depth, base_filters=4, norm="none").eval()
    x = torch.rand(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, size // 2, size // 2].backward()
    ys, xs = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    return int(max(np.abs(ys - size // 2).max(), np.abs(xs - size // 2).max()))


def test_the_default_depth_sees_the_whole_patch_from_its_centre():
    """With the default depth (3) the centre pixel's logit depends on pixels up to ~46 px away: the
    whole 64 px patch (a vessel leaving the nodule's box is in view); each pooling level widens it."""
    radii = [_centre_receptive_radius(depth) for depth in (1, 2, 3)]
    assert radii[0] < radii[1] < radii[2], radii
    assert radii[0] <= 12            # two 3x3 convs, a pooling, two more convs...: local only
    assert radii[2] >= 64 // 2, radii


def _discs(n=4, size=32, seed=0):
    """``n`` 3-channel images (n, 3, size, size) of noisy parenchyma with one bright disc each (radius
    1.5 to 4.5 px, a 3-9 mm nodule at 1 mm pixels), and the discs' masks (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for i in range(n):
        cy, cx = torch.randint(6, size - 6, (2,), generator=g)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) <= (1.5 + i) ** 2).float()
        images.append(0.3 + 0.05 * torch.randn(size, size, generator=g) + 0.4 * mask)
        masks.append(mask)
    return torch.stack(images)[:, None].repeat(1, 3, 1, 1), torch.stack(masks)[:, None]


def test_unet_can_fit_one_batch_of_small_nodules_to_the_pixel():
    """The network and loss can learn at all, at full resolution: 150 Adam steps on one batch of four
    small discs give a pixel Dice above 0.9 on it (the skip connections carry the fine detail that
    the 8x coarser bottleneck has lost; a 1.5 px disc is a single pooled pixel there)."""
    from noduleflow.losses import dice_bce_loss

    x, y = _discs()
    torch.manual_seed(0)
    model = UNet2d(3, 1, depth=2, base_filters=8)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: threads only cost time (~5 s on one core)
    try:
        for _ in range(150):
            optimiser.zero_grad()
            loss = dice_bce_loss(model(x), y)
            loss.backward()
            optimiser.step()
            first = loss.item() if first is None else first
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        predicted = torch.sigmoid(model(x)) > 0.5
    dice = float(2 * (predicted & (y > 0)).sum() / (predicted.sum() + y.sum()))
    assert loss.item() < 0.1 * first
    assert dice > 0.9, dice


def test_same_seed_same_network_other_seed_other_network():
    """A model's starting weights are a function of the torch seed (train.seed seeds it): two builds
    under one seed give identical outputs, another seed different ones."""
    x = torch.rand(2, 3, 16, 16)

    def output(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return UNet2d(3, depth=2, base_filters=4).eval()(x)

    assert torch.equal(output(5), output(5))
    assert not torch.allclose(output(5), output(6))


def _mask_and_roi(seed=0):
    rng = np.random.default_rng(seed)
    roi = (rng.random((4, 16, 16)) < 0.7).astype(np.uint8)
    mask = ((rng.random((4, 16, 16)) < 0.2) & (roi > 0)).astype(np.uint8)
    return mask, roi


def test_complementary_targets_are_exactly_one_minus_positive_inside_the_roi():
    mask, roi = _mask_and_roi()
    positive = build_targets(mask, roi, "positive")
    complementary = build_targets(mask, roi, "complementary")
    assert positive.shape == complementary.shape == (4, 1, 16, 16)
    inside = torch.from_numpy(roi > 0)[:, None]
    assert torch.equal(complementary[inside], 1 - positive[inside])
    assert torch.equal(positive[:, 0], torch.from_numpy(mask).float())
    # outside the ROI the complementary target is 0 (and the loss ignores those pixels)
    assert complementary[~inside].sum() == 0


def test_hybrid_targets_have_two_channels_positive_then_complementary():
    mask, roi = _mask_and_roi(1)
    hybrid = build_targets(mask, roi, "hybrid")
    assert hybrid.shape == (4, 2, 16, 16)
    assert torch.equal(hybrid[:, :1], build_targets(mask, roi, "positive"))
    assert torch.equal(hybrid[:, 1:], build_targets(mask, roi, "complementary"))
    assert out_channels_for("hybrid") == 2 and out_channels_for("positive") == out_channels_for("complementary") == 1


def test_nodule_probability_per_label_mode():
    logits = torch.randn(3, 2, 8, 8)
    assert torch.allclose(nodule_probability(logits[:, :1], "positive"), torch.sigmoid(logits[:, 0]))
    # a complementary model predicts "not nodule": its nodule probability is the complement
    assert torch.allclose(nodule_probability(logits[:, :1], "complementary"), 1 - torch.sigmoid(logits[:, 0]))
    assert torch.allclose(nodule_probability(logits, "hybrid", "positive"), torch.sigmoid(logits[:, 0]))
    assert torch.allclose(nodule_probability(logits, "hybrid", "negative"), 1 - torch.sigmoid(logits[:, 1]))
    assert nodule_probability(logits, "hybrid").shape == (3, 8, 8)
    with pytest.raises(ValueError):
        nodule_probability(logits, "hybrid", "both")


def test_load_model_round_trip(tmp_path):
    kwargs = {"in_channels": 3, "out_channels": 2, "depth": 2, "base_filters": 4, "norm": "batch", "dropout": 0.0}
    model = UNet2d(**kwargs)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "model": kwargs, "label_mode": "hybrid", "fold": 0}, path)
    loaded, meta = load_model(path)
    assert not loaded.training
    assert meta["label_mode"] == "hybrid" and meta["model"] == kwargs and "state_dict" not in meta
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_model_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(InputError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
