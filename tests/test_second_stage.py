"""The second stage: crops around candidates, the crop classifier, and the cross-fitted re-scoring.

What a user relies on: a crop shows the candidate at its centre at its own scale, in world
coordinates whatever the scan's geometry; the classifier learns what tells a nodule (a ball) from a
tube end; re-scoring changes only probabilities, never which candidates there are or where, and a
fold's own labels never reach its scores; everything is seeded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from noduleflow.candidate_classifier import classify, combine, fit_classifier
from noduleflow.candidate_crops import CHANNELS, candidate_crop, crop_side_mm, crop_variants
from noduleflow.froc import FP, TP
from noduleflow.io import Geometry, InputError, voxel_to_world, write_image
from noduleflow.second_stage import (CROP_FILE_FORMAT, check_settings, read_fold_crops, rescore_fold,
                                     write_fold_crops)

SIZE = 16


def ball_and_tube_volume(shape=(48, 64, 64)):
    """int16 HU volume (z, y, x): lung (-850 HU) with a 10-voxel ball and a thick tube along x that
    ends inside the volume; returns (volume, ball centre zyx, tube end zyx)."""
    z, y, x = np.indices(shape)
    vol = np.full(shape, -850, np.int16)
    ball = (24, 20, 20)
    vol[(z - ball[0]) ** 2 + (y - ball[1]) ** 2 + (x - ball[2]) ** 2 <= 25] = 40
    tube_end = (24, 46, 40)
    tube = ((z - 24) ** 2 + (y - 46) ** 2 <= 25) & (x >= 40)
    cap = (z - 24) ** 2 + (y - 46) ** 2 + (x - 40) ** 2 <= 25
    vol[tube | cap] = 40
    return vol, ball, tube_end


def test_a_crop_is_centred_on_the_world_position_at_the_candidates_scale():
    vol, ball, _ = ball_and_tube_volume()
    # anisotropic spacing and a shifted origin: the crop follows world mm, not voxel indices
    geometry = Geometry(spacing=(0.7, 0.8, 1.25), origin=(-40.0, 12.5, -300.0))
    prob = np.zeros(vol.shape, np.uint8)
    centre = voxel_to_world(np.asarray(ball, float), geometry)
    crop = candidate_crop(vol.astype(np.float32), prob.astype(np.float32), geometry, centre, side_mm=24.0, size=SIZE)
    assert crop.shape == (len(CHANNELS), SIZE, SIZE, SIZE) and crop.dtype == np.uint8
    image = crop[0].astype(float) / 255
    mid = SIZE // 2
    # soft tissue (40 HU -> 0.74 in the [-1000, 400] window) at the centre, lung at the corners
    assert image[mid - 1:mid + 1, mid - 1:mid + 1, mid - 1:mid + 1].min() > 0.7
    assert image[0, 0, 0] < 0.15 and image[-1, -1, -1] < 0.15
    # a crop beyond the scan is air (image 0) and probability 0
    far = centre + np.array([500.0, 0.0, 0.0])
    outside = candidate_crop(vol.astype(np.float32), prob.astype(np.float32), geometry, far, 24.0, SIZE)
    assert outside.max() == 0


def test_the_crop_side_follows_the_diameter_within_its_limits():
    assert crop_side_mm(10.0) == 30.0
    assert crop_side_mm(3.0) == 24.0 and crop_side_mm(float("nan")) == 24.0
    assert crop_side_mm(60.0) == 96.0


def test_crop_variants_are_seeded_and_variant_zero_is_the_exact_crop():
    vol, ball, end = ball_and_tube_volume()
    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    prob = (vol > 0).astype(np.uint8) * 200
    centres = voxel_to_world(np.asarray([ball, end], float), geometry)
    a = crop_variants(vol, prob, geometry, centres, np.array([10.0, 10.0]), 3, np.random.default_rng(5), SIZE)
    b = crop_variants(vol, prob, geometry, centres, np.array([10.0, 10.0]), 3, np.random.default_rng(5), SIZE)
    assert a.shape == (2, 3, len(CHANNELS), SIZE, SIZE, SIZE)
    np.testing.assert_array_equal(a, b)
    exact = candidate_crop(vol.astype(np.float32), prob.astype(np.float32), geometry, centres[0], 30.0, SIZE)
    np.testing.assert_array_equal(a[0, 0], exact)
    assert not np.array_equal(a[0, 1], a[0, 0]) and not np.array_equal(a[0, 2], a[0, 1])
    # the probability channel carries the detector's map
    assert a[0, 0, 1].max() >= 190


def toy_crops(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Crops (n, 2 variants, 2, S, S, S) of balls (label 1) and tube ends along a random axis
    (label 0), both bright in the probability channel, so only shape tells them apart."""
    z, y, x = np.indices((SIZE,) * 3) - (SIZE - 1) / 2
    crops = np.zeros((n, 2, 2, SIZE, SIZE, SIZE), np.uint8)
    labels = np.arange(n) % 2 == 0
    for i in range(n):
        for v in range(2):
            r = rng.uniform(2.2, 3.2)
            shift = rng.uniform(-1, 1, 3)
            zz, yy, xx = z - shift[0], y - shift[1], x - shift[2]
            if labels[i]:
                shape = zz ** 2 + yy ** 2 + xx ** 2 <= r ** 2
            else:
                axes = [zz, yy, xx]
                a = int(rng.integers(3))
                along = axes[a] * (1 if rng.random() < 0.5 else -1)
                across = sum(axes[j] ** 2 for j in range(3) if j != a)
                shape = ((across <= r ** 2) & (along >= 0)) | (across + along ** 2 <= r ** 2)
            noise = rng.normal(0, 8, shape.shape)
            crops[i, v, 0] = np.clip(np.where(shape, 190, 30) + noise, 0, 255)
            crops[i, v, 1] = np.where(shape, 200, 0)
    return crops, labels


def test_the_classifier_tells_balls_from_tube_ends_and_is_seeded():
    rng = np.random.default_rng(0)
    crops, labels = toy_crops(64, rng)
    diam = np.full(len(labels), 6.0)
    model, summary = fit_classifier(crops, diam, labels, seed=3, epochs=12, batch_size=16, width=4, lr=3e-3)
    assert summary["n_nodule"] == 32 and summary["n_false_positive"] == 32
    test_crops, test_labels = toy_crops(40, np.random.default_rng(1))
    q = classify(model, test_crops[:, 0], np.full(len(test_labels), 6.0))
    # every ball above every tube end but a few (rank AUC)
    pos, neg = q[test_labels], q[~test_labels]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.9, auc
    again, _ = fit_classifier(crops, diam, labels, seed=3, epochs=12, batch_size=16, width=4, lr=3e-3)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    # one class only: nothing to fit
    assert fit_classifier(crops[labels], diam[labels], labels[labels], seed=0, epochs=1) is None


def test_combine_and_settings():
    p, q = np.array([0.8, 0.2]), np.array([0.2, 0.8])
    np.testing.assert_allclose(combine(p, q, "mean"), [0.5, 0.5])
    np.testing.assert_allclose(combine(p, q, "classifier"), q)
    np.testing.assert_allclose(combine(p, q, "geometric"), [0.4, 0.4])
    assert check_settings({})["combine"] == "mean"
    for bad, match in (({"combine": "max"}, "combine"), ({"crop_voxels": 12}, "crop_voxels"),
                       ({"epochs": 0}, "epochs"), ({"epochs": True}, "epochs"), ({"depth": 3}, "unknown")):
        with pytest.raises(InputError, match=match):
            check_settings(bad)


def make_fold(tmp_path, fold: int, uids: list[str], rng: np.random.Generator):
    """A fold's slice stores, probability volumes and candidates: each scan one ball (annotated
    nodule, found) and one tube end (false positive)."""
    from noduleflow.slices import extract_slices

    geometry = Geometry(spacing=(1.0, 1.0, 1.0), origin=(-30.0, -30.0, -20.0))
    pred = tmp_path / f"fold{fold}"
    (pred / "probabilities").mkdir(parents=True)
    rows, notes = [], []
    for uid in uids:
        vol, ball, end = ball_and_tube_volume()
        vol = (vol + rng.normal(0, 15, vol.shape)).astype(np.int16)
        lung = np.ones(vol.shape, np.uint8)
        labels = np.zeros(vol.shape, np.uint8)
        zz, yy, xx = np.indices(vol.shape)
        labels[(zz - ball[0]) ** 2 + (yy - ball[1]) ** 2 + (xx - ball[2]) ** 2 <= 25] = 1
        for name, arr in (("img", vol), ("lung", lung), ("lab", labels)):
            write_image(arr, geometry, tmp_path / f"{uid}_{name}.mha")
        extract_slices(tmp_path / f"{uid}_img.mha", tmp_path / f"{uid}_lung.mha", tmp_path / f"{uid}_lab.mha", uid,
                       tmp_path / "slices" / f"{uid}.h5")
        write_image(((vol > -300) * 220).astype(np.uint8), geometry, pred / "probabilities" / f"{uid}.mha")
        b, e = voxel_to_world(np.asarray([ball, end], float), geometry)
        rows += [{"seriesuid": uid, "coordX": b[0], "coordY": b[1], "coordZ": b[2], "probability": 0.6,
                  "diameter_mm": 10.0},
                 {"seriesuid": uid, "coordX": e[0], "coordY": e[1], "coordZ": e[2], "probability": 0.7,
                  "diameter_mm": 10.0}]
        notes.append({"seriesuid": uid, "coordX": b[0], "coordY": b[1], "coordZ": b[2], "diameter_mm": 10.0})
    pd.DataFrame(rows).to_csv(pred / "candidates.csv", index=False)
    return pd.DataFrame(notes)


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("second_stage")
    rng = np.random.default_rng(0)
    uids = {k: [f"1.2.{k}.{i}" for i in range(3)] for k in range(3)}
    notes = pd.concat([make_fold(tmp_path, k, uids[k], rng) for k in range(3)], ignore_index=True)
    notes.to_csv(tmp_path / "annotations.csv", index=False)
    pd.DataFrame([{"seriesuid": u, "fold": k} for k in uids for u in uids[k]]).to_csv(tmp_path / "folds.csv", index=False)
    stores = sorted((tmp_path / "slices").glob("*.h5"))
    for k in range(3):
        write_fold_crops(tmp_path / f"fold{k}" / "candidates.csv", tmp_path / f"fold{k}" / "probabilities",
                         tmp_path / "folds.csv", k, stores, tmp_path / "annotations.csv",
                         tmp_path / f"fold{k}" / "crops.h5", variants=2, crop_voxels=SIZE, seed=0)
    return tmp_path


SETTINGS = {"epochs": 15, "width": 4, "crop_voxels": SIZE, "variants": 2, "combine": "classifier"}


def test_the_crop_file_holds_every_candidate_and_nodule_with_its_outcome(three_folds):
    crops = read_fold_crops(three_folds / "fold1" / "crops.h5")
    assert crops["fold"] == 1 and crops["candidate_crops"].shape == (6, 2, 2, SIZE, SIZE, SIZE)
    assert crops["nodule_crops"].shape == (3, 2, 2, SIZE, SIZE, SIZE)
    assert list(crops["outcome"]) == [TP, FP] * 3
    bad = three_folds / "not_crops.h5"
    import h5py
    with h5py.File(bad, "w") as h5:
        h5.attrs["format"] = "something else"
    with pytest.raises(InputError, match=f"not_crops.h5: not a candidate crop file.*{CROP_FILE_FORMAT}"):
        read_fold_crops(bad)


def test_rescoring_changes_only_probabilities_and_ranks_the_balls_first(three_folds, tmp_path):
    paths = [three_folds / f"fold{k}" / "crops.h5" for k in range(3)]
    before = pd.read_csv(three_folds / "fold0" / "candidates.csv", dtype={"seriesuid": str})
    out = rescore_fold(paths, 0, three_folds / "fold0" / "candidates.csv", tmp_path / "c.csv", tmp_path / "m.pt",
                       SETTINGS)
    written = pd.read_csv(tmp_path / "c.csv", dtype={"seriesuid": str})
    pd.testing.assert_frame_equal(written[["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]],
                                  before[["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]])
    np.testing.assert_array_equal(written["detector_probability"], before["probability"])
    np.testing.assert_allclose(written["probability"], out["probability"])
    # the detector ranked every tube end (0.7) above every ball (0.6); the classifier turns that round
    balls, ends = written["probability"][0::2].to_numpy(), written["probability"][1::2].to_numpy()
    assert balls.min() > ends.max(), written
    saved = torch.load(tmp_path / "m.pt", weights_only=False)
    assert saved["fold"] == 0 and saved["classifier"] is not None and saved["settings"]["epochs"] == 15
    # same inputs, same settings: the same probabilities, bit for bit
    rescore_fold(paths, 0, three_folds / "fold0" / "candidates.csv", tmp_path / "c2.csv", tmp_path / "m2.pt", SETTINGS)
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "c2.csv")["probability"], written["probability"])


def test_a_folds_own_labels_never_reach_its_scores(three_folds, tmp_path):
    """Fold 0's crop file with every outcome flipped and its nodules removed: fold 0's scores stay
    bit for bit (its classifier is fitted on folds 1 and 2 only)."""
    import shutil

    import h5py

    flipped = tmp_path / "fold0_flipped.h5"
    shutil.copy(three_folds / "fold0" / "crops.h5", flipped)
    with h5py.File(flipped, "a") as h5:
        outcome = h5["candidate_table/outcome"][()]
        del h5["candidate_table/outcome"]
        h5["candidate_table/outcome"] = np.where(outcome == TP.encode(), FP.encode(), TP.encode())
        for name in ("nodule_crops", "nodule_diameter_mm"):
            shape = h5[name].shape
            del h5[name]
            h5[name] = np.zeros((0, *shape[1:]), np.uint8 if name == "nodule_crops" else float)
    others = [three_folds / f"fold{k}" / "crops.h5" for k in (1, 2)]
    cands = three_folds / "fold0" / "candidates.csv"
    a = rescore_fold([three_folds / "fold0" / "crops.h5", *others], 0, cands, tmp_path / "a.csv", tmp_path / "a.pt", SETTINGS)
    b = rescore_fold([flipped, *others], 0, cands, tmp_path / "b.csv", tmp_path / "b.pt", SETTINGS)
    np.testing.assert_array_equal(a["probability"].to_numpy(), b["probability"].to_numpy())


def test_rescoring_refuses_candidates_that_are_not_the_crop_files(three_folds, tmp_path):
    paths = [three_folds / f"fold{k}" / "crops.h5" for k in range(3)]
    moved = pd.read_csv(three_folds / "fold0" / "candidates.csv", dtype={"seriesuid": str})
    moved.loc[0, "coordX"] += 5.0
    moved.to_csv(tmp_path / "moved.csv", index=False)
    with pytest.raises(InputError, match="moved.csv: its candidates are not those of fold 0's crop file"):
        rescore_fold(paths, 0, tmp_path / "moved.csv", tmp_path / "c.csv", tmp_path / "m.pt", SETTINGS)
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "m.pt").exists()
    with pytest.raises(InputError, match="a second crop file of fold 1"):
        rescore_fold([*paths, paths[1]], 0, three_folds / "fold0" / "candidates.csv", tmp_path / "c.csv",
                     tmp_path / "m.pt", SETTINGS)


def test_crops_refuse_candidates_of_scans_the_fold_does_not_hold(three_folds, tmp_path):
    cands = pd.read_csv(three_folds / "fold0" / "candidates.csv", dtype={"seriesuid": str})
    cands.loc[0, "seriesuid"] = "9.9.9"
    cands.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(InputError, match="c.csv: candidates of scan\\(s\\) not held out in fold 0: 9.9.9"):
        write_fold_crops(tmp_path / "c.csv", three_folds / "fold0" / "probabilities", three_folds / "folds.csv", 0,
                         sorted((three_folds / "slices").glob("*.h5")), three_folds / "annotations.csv",
                         tmp_path / "crops.h5")
    assert not (tmp_path / "crops.h5").exists()
