"""Inference: candidate extraction from probability volumes, the sliding over slices, predict_fold."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from noduleflow import model as nf_model
from noduleflow.io import Geometry, InputError, read_image, voxel_to_world, world_to_voxel
from noduleflow.predict import (CANDIDATE_COLUMNS, candidates_from_probability, elongation, merge_close_candidates,
                                to_uint8)

GEOMETRY = Geometry(spacing=(0.9, 0.8, 1.25), origin=(-120.5, 33.2, -200.7),
                    direction=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def sphere(shape, centre_zyx, radius_mm, geometry):
    """Bool (z, y, x): voxels whose centre lies within ``radius_mm`` of a voxel-space centre."""
    zz, yy, xx = np.indices(shape, dtype=float)
    sz, sy, sx = geometry.spacing[2], geometry.spacing[1], geometry.spacing[0]
    c = centre_zyx
    return ((zz - c[0]) * sz) ** 2 + ((yy - c[1]) * sy) ** 2 + ((xx - c[2]) * sx) ** 2 <= radius_mm ** 2


def test_perfectly_predicted_nodule_lands_within_1_5_mm_of_its_centre():
    shape = (30, 50, 50)
    true_world = np.array([-140.3, 50.1, -184.9])       # x, y, z mm
    centre = world_to_voxel(true_world, GEOMETRY)       # off-grid voxel position
    assert ((centre > 5) & (centre < np.array(shape) - 5)).all()
    nodule = sphere(shape, centre, 5.0, GEOMETRY)
    prob = nodule.astype(np.float32)
    prob[2:4, 2:4, 2:4] = 0.9                           # a 8-voxel blob of 5.76 mm3: below 10 mm3
    far = sphere(shape, (24.0, 40.0, 40.0), 2.5, GEOMETRY)
    prob[far] = 0.7                                     # a second, less probable component
    stored = to_uint8(prob)
    cands = candidates_from_probability(stored, GEOMETRY, threshold=0.5, min_volume_mm3=10.0, seriesuid="S")
    assert list(cands.columns) == CANDIDATE_COLUMNS
    assert len(cands) == 2                              # the small blob is dropped
    best = cands.iloc[0]
    assert best["mean_probability"] == 1.0
    assert cands.iloc[1]["mean_probability"] == pytest.approx(0.7, abs=1 / 255)
    assert best["probability"] == pytest.approx(1.0 / best["elongation"])   # predict.elongation_exponent 1
    assert best["elongation"] < 1.1                     # a sphere in mm, on anisotropic voxels
    xyz = best[["coordX", "coordY", "coordZ"]].to_numpy(float)
    assert np.linalg.norm(xyz - true_world) < 1.5
    voxel_mm3 = 0.9 * 0.8 * 1.25
    assert best["volume_mm3"] == pytest.approx(nodule.sum() * voxel_mm3)
    assert best["volume_mm3"] == pytest.approx(4 / 3 * math.pi * 5.0 ** 3, rel=0.1)
    assert best["diameter_mm"] == pytest.approx(10.0, abs=0.5)
    assert (cands["seriesuid"] == "S").all()
    # float probabilities give the same components
    same = candidates_from_probability(prob, GEOMETRY, threshold=0.5, min_volume_mm3=10.0)
    np.testing.assert_allclose(same["coordX"], cands["coordX"], atol=1e-6)


def test_centre_is_probability_weighted():
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    prob = np.zeros((3, 3, 12), np.float32)
    prob[1, 1, 2:10] = 0.6
    prob[1, 1, 8:10] = 1.0                              # the peak pulls the centre towards x = 8.5
    cands = candidates_from_probability(prob, geometry, 0.5, 0.0)
    plain = np.arange(2, 10).mean()
    weights = prob[1, 1, 2:10]
    weighted = (np.arange(2, 10) * weights).sum() / weights.sum()
    assert cands["coordX"].iloc[0] == pytest.approx(weighted)
    assert cands["coordX"].iloc[0] > plain
    assert cands["volume_mm3"].iloc[0] == 8.0


# --------------------------------------------------------------------------- with a stand-in model


def synthetic_scan():
    """A small chest-like volume: air, a body block (40 HU), a lung (-850 HU), a nodule (0 HU)."""
    shape = (20, 48, 52)
    image = np.full(shape, -1000, np.int16)
    image[:, 4:44, 4:48] = 40
    lung = np.zeros(shape, np.uint8)
    lung[2:18, 10:38, 10:42] = 1
    image[lung > 0] = -850
    centre = np.array([9.4, 22.6, 27.3])
    nodule = sphere(shape, centre, 4.0, GEOMETRY) & (lung > 0)
    image[nodule] = 0
    return image, lung, nodule.astype(np.uint8), centre


class ThresholdNet:
    """Stand-in for the U-Net: logit = 50 (x_centre - 0.5) on the centre channel (0.5 = -300 HU in
    the [-1000, 400] window), so anything denser than -300 HU is "nodule". Records input shapes."""

    def __init__(self):
        import torch

        self.torch = torch
        self.shapes = []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        c = x.shape[1] // 2
        return 50.0 * (x[:, c:c + 1] - 0.5)

    def eval(self):
        return self


META = {"model": {"in_channels": 3, "out_channels": 1, "depth": 3, "base_filters": 4, "norm": "batch",
                  "dropout": 0.0},
        "label_mode": "positive", "intensity": {"window_hu": [-1000, 400]}, "context": 1,
        "patch_size": 32, "lung_roi": True, "fold": 0}


def test_predict_volume_restricts_to_the_lung_only_with_lung_roi():
    from noduleflow.predict import predict_volume

    image, lung, nodule, centre = synthetic_scan()
    net = ThresholdNet()
    with_roi = predict_volume(net, META, image, lung, lung_roi=True, batch_size=4, planes=("axial",))
    assert all(s[1] == 3 and s[2] % 8 == 0 and s[3] % 8 == 0 for s in net.shapes)
    assert sum(s[0] for s in net.shapes) == 16                 # only the 16 slices with lung
    assert with_roi.shape == image.shape and with_roi.dtype == np.float32
    assert (with_roi[nodule > 0] > 0.99).all()
    assert with_roi[lung == 0].max() == 0.0                    # body wall suppressed
    assert (with_roi > 0.5).sum() == nodule.sum()

    without = predict_volume(ThresholdNet(), META, image, lung, lung_roi=False, batch_size=4, planes=("axial",))
    body = image > -500
    assert (without[nodule > 0] > 0.99).all()
    assert (without[body & (lung == 0)] > 0.99).all()          # the whole body slice is seen
    cands = candidates_from_probability(to_uint8(with_roi), GEOMETRY, 0.5, 10.0)
    assert len(cands) == 1
    assert np.linalg.norm(cands[["coordX", "coordY", "coordZ"]].to_numpy()[0]
                          - voxel_to_world(centre, GEOMETRY)) < 1.5


def write_slice_store(path, uid, image, lung, nodule, geometry):
    """A slice store in the contract's format (datasets, chunks, attrs, slice table)."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, data in (("image", image), ("lung", lung), ("nodule", nodule)):
            f.create_dataset(name, data=data, chunks=(1,) + data.shape[1:], compression="gzip")
        f.attrs["seriesuid"] = uid
        for key, value in geometry.as_attrs().items():
            f.attrs[key] = value
        table = np.zeros(image.shape[0], dtype=[("z", "i8"), ("lung_pixels", "i8"), ("nodule_pixels", "i8")])
        table["z"] = np.arange(image.shape[0])
        table["lung_pixels"] = lung.reshape(len(lung), -1).sum(1)
        table["nodule_pixels"] = (nodule > 0).reshape(len(nodule), -1).sum(1)
        f.create_dataset("slice_table", data=table)


def test_predict_fold_writes_probabilities_and_candidates(tmp_path, monkeypatch):
    from noduleflow.predict import predict_fold

    image, lung, nodule, centre = synthetic_scan()
    stores = []
    for uid in ("1.2.3", "4.5.6", "7.8.9"):
        path = tmp_path / "slices" / f"{uid}.h5"
        path.parent.mkdir(exist_ok=True)
        write_slice_store(path, uid, image, lung, nodule, GEOMETRY)
        stores.append(path)
    folds = tmp_path / "folds.csv"
    folds.write_text("seriesuid,fold\n1.2.3,0\n4.5.6,1\n7.8.9,0\n", encoding="utf-8")
    model_path = tmp_path / "model.pt"
    model_path.write_bytes(b"stand-in")
    monkeypatch.setattr(nf_model, "load_model", lambda path, device="cpu": (ThresholdNet(), dict(META)))

    out = tmp_path / "pred" / "probabilities"
    cands_path = tmp_path / "pred" / "candidates.csv"
    cands = predict_fold(model_path, folds, 0, stores, cands_path, out, lung_roi=True, threads=1,
                         threshold=0.4, min_volume_mm3=10, batch_size=8)
    assert sorted(p.name for p in out.iterdir()) == ["1.2.3.mha", "7.8.9.mha", "threshold.json"]
    assert json.loads((out / "threshold.json").read_text(encoding="utf-8"))["threshold"] == 0.4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temporary left
    prob, geometry = read_image(out / "1.2.3.mha")
    assert prob.dtype == np.uint8 and prob.shape == image.shape
    assert np.allclose(geometry.origin, GEOMETRY.origin) and np.allclose(geometry.spacing, GEOMETRY.spacing)
    written = pd.read_csv(cands_path, dtype={"seriesuid": str})
    assert list(written.columns) == CANDIDATE_COLUMNS
    assert sorted(written["seriesuid"]) == ["1.2.3", "7.8.9"] and len(cands) == 2
    truth = voxel_to_world(centre, GEOMETRY)
    for _, row in written.iterrows():
        assert np.linalg.norm(row[["coordX", "coordY", "coordZ"]].to_numpy(float) - truth) < 1.5

    # a fold whose scan has no slice store fails before writing anything
    with pytest.raises(InputError, match="4.5.6"):
        predict_fold(model_path, folds, 1, stores[:1], tmp_path / "x.csv", tmp_path / "xprob", lung_roi=True)
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "xprob").exists()


def test_predict_fold_with_a_real_saved_unet(tmp_path):
    import torch

    from noduleflow.predict import predict_fold

    image, lung, nodule, _ = synthetic_scan()
    store = tmp_path / "9.9.h5"
    write_slice_store(store, "9.9", image, lung, nodule, GEOMETRY)
    folds = tmp_path / "folds.csv"
    folds.write_text("seriesuid,fold\n9.9,0\n", encoding="utf-8")
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, out_channels=2, depth=2, base_filters=4, norm="batch", dropout=0.0)
    net = nf_model.UNet2d(**kwargs)
    torch.save({"state_dict": net.state_dict(), "model": kwargs, "label_mode": "hybrid",
                "intensity": {"window_hu": [-1000, 400]}, "context": 1, "patch_size": 32, "lung_roi": True,
                "fold": 0, "heldout_patch_dice": 0.0}, tmp_path / "model.pt")
    out = tmp_path / "probabilities"
    predict_fold(tmp_path / "model.pt", folds, 0, [store], tmp_path / "candidates.csv", out, lung_roi=True,
                 hybrid_output="negative")
    prob, _ = read_image(out / "9.9.mha")
    assert prob.shape == image.shape and prob[lung == 0].max() == 0
    assert pd.read_csv(tmp_path / "candidates.csv").columns.tolist() == CANDIDATE_COLUMNS


def test_three_plane_probability_is_the_mean_of_the_planes():
    from noduleflow.planes import from_plane, to_plane
    from noduleflow.predict import predict_plane, predict_volume

    image, lung, nodule, _ = synthetic_scan()
    net = ThresholdNet()
    both = predict_volume(net, META, image, lung, lung_roi=True, batch_size=4,
                          planes=["axial", "coronal", "sagittal"])
    seen = {s[2:] for s in net.shapes}
    assert len(seen) >= 2                  # slices of different planes have different sizes
    per_plane = [from_plane(predict_plane(ThresholdNet(), META, to_plane(image, p), to_plane(lung, p), True,
                                          batch_size=4), p) for p in ("axial", "coronal", "sagittal")]
    np.testing.assert_allclose(both, np.mean(per_plane, axis=0), atol=1e-6)
    assert (both[nodule > 0] > 0.99).all()   # dense in every plane
    assert both[lung == 0].max() == 0.0


def test_candidate_score_is_the_mean_or_the_max_of_the_component():
    prob = np.zeros((12, 20, 20), np.float32)
    prob[3:8, 5:10, 5:10] = 0.6
    prob[5, 7, 7] = 1.0
    mean = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, elongation_exponent=0.0)
    peak = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, score="max", elongation_exponent=0.0)
    expected_mean = (0.6 * 124 + 1.0) / 125
    assert mean["probability"].iloc[0] == pytest.approx(expected_mean)
    assert peak["probability"].iloc[0] == pytest.approx(1.0)
    for frame in (mean, peak):
        assert frame["mean_probability"].iloc[0] == pytest.approx(expected_mean)
        assert frame["max_probability"].iloc[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="candidate_score"):
        candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, score="median")


def test_elongation_exponent_ranks_a_round_component_above_a_tube_and_moves_nothing():
    """A ball and a tube of the same probability: with ``elongation_exponent`` the ball ranks first
    and the tube's probability is its mean over its elongation to that power; without it they tie.
    Centres, sizes, the mean and the maximum are the same either way."""
    zz, yy, xx = np.mgrid[:20, :40, :40]
    prob = np.zeros((20, 40, 40), np.float32)
    sx, sy, sz = GEOMETRY.spacing
    ball_mm2 = ((zz - 10) * sz) ** 2 + ((yy - 10) * sy) ** 2 + ((xx - 10) * sx) ** 2
    prob[ball_mm2 <= 4.5 ** 2] = 0.8                                        # a 9 mm ball
    prob[9:12, 28:32, 5:35] = 0.8                                           # a 3.8 x 3.2 x 27 mm tube
    plain = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, elongation_exponent=0.0)
    ranked = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0)        # the default: 1
    assert plain["probability"].tolist() == pytest.approx([0.8, 0.8])
    ball, tube = ranked.iloc[0], ranked.iloc[1]
    assert ball["elongation"] < 1.2 < 5.0 < tube["elongation"]
    assert ball["probability"] == pytest.approx(0.8 / ball["elongation"])
    assert tube["probability"] == pytest.approx(0.8 / tube["elongation"])
    key = ["coordX", "coordY", "coordZ", "diameter_mm", "volume_mm3", "mean_probability", "max_probability"]
    pd.testing.assert_frame_equal(plain.sort_values("coordX")[key].reset_index(drop=True),
                                  ranked.sort_values("coordX")[key].reset_index(drop=True))
    for bad in (-0.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="elongation_exponent"):
            candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, elongation_exponent=bad)


class RecordingNet:
    """Stand-in for the U-Net that keeps its inputs and predicts nothing."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        import torch

        self.inputs.append(x.float().numpy().copy())
        return torch.full((x.shape[0], 1) + tuple(x.shape[2:]), -20.0)

    def eval(self):
        return self


@pytest.mark.parametrize("context,step", [(1, 1), (2, 3)])
def test_inference_channels_are_the_training_patch_channels(context, step):
    """Each axial slice z is fed with the slices z + j*context_step (clamped), exactly the channels
    sample_patches cuts for a patch centred on slice z: a model never sees other neighbours."""
    from noduleflow.planes import context_offsets
    from noduleflow.predict import predict_volume
    from noduleflow.sampling import cut_patches

    depth = 12
    image = np.broadcast_to((-900 + 10 * np.arange(depth, dtype=np.int16))[:, None, None], (depth, 16, 16)).copy()
    lung = np.ones(image.shape, np.uint8)
    net = RecordingNet()
    meta = {**META, "context": context, "context_step": step,
            "model": {**META["model"], "in_channels": 2 * context + 1}}
    predict_volume(net, meta, image, lung, lung_roi=True, batch_size=depth, planes=("axial",))
    fed = np.concatenate(net.inputs)
    assert fed.shape[:2] == (depth, 2 * context + 1)
    hu_fed = np.round(fed[:, :, 8, 8] * 1400 - 1000)           # back from the [-1000, 400] window
    expected = -900 + 10 * np.clip(np.arange(depth)[:, None] + context_offsets(context, step)[None, :], 0, depth - 1)
    np.testing.assert_array_equal(hu_fed, expected)
    centres = np.array([[z, 8, 8] for z in range(depth)])
    patches = cut_patches(image, lung, np.zeros_like(lung), centres, patch_size=8, context=context,
                          lung_roi=True, context_step=step)
    np.testing.assert_array_equal(patches["image"][:, :, 4, 4], expected)


def test_merging_keeps_the_most_probable_fragment_and_never_moves_a_candidate():
    frame = pd.DataFrame({
        "seriesuid": ["a", "a", "a", "b", "a"],
        "coordX": [0.0, 3.0, 20.0, 1.0, 5.5],
        "coordY": [0.0, 4.0, 0.0, 0.0, 0.0],
        "coordZ": [0.0, 0.0, 0.0, 0.0, 0.0],
        "probability": [0.6, 0.9, 0.8, 0.3, 0.7],
    })
    merged = merge_close_candidates(frame, 5.0)
    # a: 0.9 at (3, 4) keeps; 0.8 at 20 mm keeps; 0.7 at (5.5, 0) is 4.7 mm from the 0.9: dropped;
    # 0.6 at the origin is 5.0 mm from the 0.9 (not closer than 5): kept. b's lone candidate stays.
    assert merged.index.tolist() == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(merged, frame.loc[[0, 1, 2, 3]])   # positions and probabilities untouched
    assert merge_close_candidates(frame, 0.0) is frame
    assert len(merge_close_candidates(frame, 100.0)) == 2             # one per scan


def test_elongation_is_one_for_a_ball_and_large_for_a_vessel_in_mm_not_voxels():
    shape = (40, 48, 48)
    ball = sphere(shape, (20, 24, 24), 5.0, GEOMETRY)            # anisotropic voxels: round in mm
    assert elongation(np.argwhere(ball), GEOMETRY.spacing) == pytest.approx(1.0, abs=0.1)
    zz, yy, xx = np.indices(shape, dtype=float)
    vessel = (((yy - 24) * 0.8) ** 2 + ((zz - 20) * 1.25) ** 2 <= 1.5 ** 2) & (np.abs(xx - 24) * 0.9 <= 12)
    assert elongation(np.argwhere(vessel), GEOMETRY.spacing) > 4.0         # 24 mm long, 3 mm wide
    assert elongation(np.array([[3, 4, 5]]), (1.0, 1.0, 1.0)) == pytest.approx(1.0)   # one voxel: a cube
    prob = np.zeros(shape, dtype=np.float32)
    prob[ball] = 0.9
    prob[vessel & (xx > 30)] = 0.8                                # a vessel piece beside the ball
    found = candidates_from_probability(prob, GEOMETRY, 0.5, 1.0)
    assert found["elongation"].iloc[0] < 1.2 < found["elongation"].iloc[1]   # the ball first (0.9), then the vessel piece


class NeighbourNet(ThresholdNet):
    """Logit = 50 (max of the centre channel over a 5x5 neighbourhood - 0.5): a pixel is "nodule"
    when anything denser than -300 HU lies within 2 pixels of it in the input it is given."""

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        c = x.shape[1] // 2
        return 50.0 * (self.torch.nn.functional.max_pool2d(x[:, c:c + 1], 5, stride=1, padding=2) - 0.5)


def test_a_model_with_a_roi_margin_sees_the_tissue_around_the_lung_and_marks_only_the_lung():
    from noduleflow.predict import predict_volume

    image, lung, _nodule, _centre = synthetic_scan()
    image[image == 0] = -850                                   # no nodule: only the body wall is dense
    spacing_zyx = tuple(GEOMETRY.spacing)[::-1]
    without = predict_volume(NeighbourNet(), META, image, lung, lung_roi=True, planes=("axial",),
                             spacing_zyx=spacing_zyx)
    assert without.max() < 0.01                                # the wall is air in the input
    meta = {**META, "roi_margin_mm": 3.0}
    seen = predict_volume(NeighbourNet(), meta, image, lung, lung_roi=True, planes=("axial",),
                          spacing_zyx=spacing_zyx)
    assert seen[lung == 0].max() == 0.0                        # candidates stay inside the lung
    edge = np.zeros_like(lung, dtype=bool)
    edge[2:18, 10:38, 10:12] = True                            # two lung columns beside the wall (0.9 mm)
    assert (seen[edge] > 0.99).all()
    assert seen[2:18, 14:34, 14:38].max() < 0.01               # deeper in the lung nothing changes
    with pytest.raises(ValueError, match="voxel spacing"):
        predict_volume(NeighbourNet(), meta, image, lung, lung_roi=True, planes=("axial",))


class LungChannelNet(ThresholdNet):
    """Logit = 50 (last input channel - 0.5): marks exactly what the lung channel says is lung."""

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return 50.0 * (x[:, -1:] - 0.5)


def test_inference_gives_a_lung_channel_model_the_lung_mask_of_each_slice_in_every_plane():
    from noduleflow.predict import predict_volume

    image, lung, _nodule, _centre = synthetic_scan()
    lung[8:11, 20:26, 20:30] = 0                               # a hole: the channel must follow the mask
    meta = {**META, "intensity": {"window_hu": [-1000, 400], "lung_channel": True}, "roi_margin_mm": 3.0}
    net = LungChannelNet()
    prob = predict_volume(net, meta, image, lung, lung_roi=True, planes=("axial", "coronal", "sagittal"),
                          spacing_zyx=tuple(GEOMETRY.spacing)[::-1])
    assert all(s[1] == 3 + 1 for s in net.shapes)              # context 1 (3 slices) + the lung
    np.testing.assert_array_equal(prob > 0.5, lung > 0)
