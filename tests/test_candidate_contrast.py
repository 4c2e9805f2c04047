"""Candidates' density contrast to the lung around them (noduleflow.candidate_contrast) and how it
ranks candidates in noduleflow.predict: what a user relies on is that a visible nodule keeps its
score, a blob of plain parenchyma loses it, and nothing but the ranking changes."""

import math

import numpy as np
import pytest

from noduleflow.candidate_contrast import SHELL_MM, check_contrast_hu, contrast_factor, density_contrast
from noduleflow.io import Geometry, InputError
from noduleflow.predict import candidates_from_probability, label_candidates

GEOMETRY = Geometry(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
SHAPE = (40, 60, 60)


def ball(centre, radius, shape=SHAPE):
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def test_contrast_is_the_mean_inside_minus_the_median_of_the_lung_around():
    image = np.full(SHAPE, -850, dtype=np.int16)
    nodule = ball((20, 20, 20), 4)
    image[nodule] = -550                                  # ground glass, 300 HU over the lung
    labels = nodule.astype(np.int32)
    contrast = density_contrast(image, labels, [1], GEOMETRY.spacing)
    assert contrast == pytest.approx([300.0])


def test_the_shell_leaves_out_other_candidates_and_what_is_outside_the_lung():
    """A juxta-pleural nodule: the chest wall beside it (outside the lung mask) and a second candidate
    touching its shell do not count as its surroundings."""
    image = np.full(SHAPE, -850, dtype=np.int16)
    lung = np.ones(SHAPE, dtype=np.uint8)
    lung[:, :, 45:] = 0
    image[:, :, 45:] = 40                                # chest wall
    nodule = ball((20, 30, 40), 4)
    neighbour = ball((20, 30, 30), 3)
    image[nodule] = 30
    image[neighbour] = 60
    labels = nodule.astype(np.int32) + 2 * neighbour.astype(np.int32)
    with_mask = density_contrast(image, labels, [1, 2], GEOMETRY.spacing, lung=lung)
    assert with_mask == pytest.approx([880.0, 910.0])
    # without the mask the wall is part of the nodule's shell: its median is still the lung's here,
    # but a larger share of wall would pull it up
    assert density_contrast(image, labels, [1], GEOMETRY.spacing)[0] <= with_mask[0]


def test_an_empty_shell_gives_nan_and_nan_leaves_the_score_alone():
    image = np.zeros((5, 5, 5), dtype=np.int16)
    labels = np.ones((5, 5, 5), dtype=np.int32)           # the component fills the volume
    assert math.isnan(density_contrast(image, labels, [1], (1.0, 1.0, 1.0))[0])
    assert contrast_factor(np.array([np.nan, 50.0, 150.0, -20.0]), 100.0).tolist() == [1.0, 0.5, 1.0, 0.0]
    assert contrast_factor(np.array([-20.0, 5.0]), 0.0).tolist() == [1.0, 1.0]   # 0 = off


def test_a_faint_blob_of_parenchyma_ranks_below_a_dense_nodule_and_nothing_else_moves():
    rng = np.random.default_rng(0)
    image = np.rint(rng.normal(-850, 25, SHAPE)).astype(np.int16)
    nodule = ball((20, 15, 15), 4)
    blob = ball((20, 45, 45), 4)
    image[nodule] = 20
    prob = np.zeros(SHAPE, dtype=np.float32)
    prob[nodule] = 0.7
    prob[blob] = 0.9                                      # the model is surer of the blob
    plain = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, elongation_exponent=0.0)
    assert plain["coordX"].iloc[0] == pytest.approx(45.0)                 # blob first without the image
    assert plain["contrast_hu"].isna().all()
    ranked = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, elongation_exponent=0.0, image=image,
                                         contrast_hu=100.0)
    assert ranked["coordX"].iloc[0] == pytest.approx(15.0)                # the nodule first with it
    nodule_row, blob_row = ranked.iloc[0], ranked.iloc[1]
    assert nodule_row["contrast_hu"] == pytest.approx(870.0, abs=10.0)
    assert abs(blob_row["contrast_hu"]) < 20.0
    assert nodule_row["probability"] == pytest.approx(0.7, abs=0.01)
    assert blob_row["probability"] == pytest.approx(0.9 * max(0.0, blob_row["contrast_hu"]) / 100.0, abs=1e-6)
    # positions, sizes and the summaries are those of the plain extraction
    same = ranked.sort_values("coordX").reset_index(drop=True)
    before = plain.sort_values("coordX").reset_index(drop=True)
    for column in ("coordX", "coordY", "coordZ", "diameter_mm", "volume_mm3", "mean_probability",
                   "max_probability", "elongation"):
        assert same[column].tolist() == pytest.approx(before[column].tolist())
    # off: the plain scores, the contrast still reported
    off = candidates_from_probability(prob, GEOMETRY, 0.5, 0.0, elongation_exponent=0.0, image=image, contrast_hu=0.0)
    assert off["probability"].tolist() == pytest.approx(plain["probability"].tolist())
    assert off["contrast_hu"].notna().all()


def test_label_map_rows_follow_the_contrast_ranking():
    image = np.full(SHAPE, -850, dtype=np.int16)
    nodule, blob = ball((20, 15, 15), 4), ball((20, 45, 45), 4)
    image[nodule] = 20
    prob = np.zeros(SHAPE, dtype=np.float32)
    prob[nodule], prob[blob] = 0.7, 0.9
    table, labels = label_candidates(prob, GEOMETRY, 0.5, 0.0, image=image)
    assert labels[20, 15, 15] == 1 and labels[20, 45, 45] == 2
    assert table["probability"].iloc[1] == pytest.approx(0.0)


def test_shell_width_is_in_mm():
    """On 2 mm voxels the shell is SHELL_MM wide, not SHELL_MM voxels: a dense ring 2 voxels (4 mm)
    out is outside it."""
    image = np.full(SHAPE, -850, dtype=np.int16)
    inner = ball((20, 30, 30), 3)
    ring = ball((20, 30, 30), 6) & ~ball((20, 30, 30), 5)
    image[inner] = 0
    image[ring] = 500
    spacing_2mm = (2.0, 2.0, 2.0)
    assert SHELL_MM < 4.0
    assert density_contrast(image, inner.astype(np.int32), [1], spacing_2mm)[0] == pytest.approx(850.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "dense"])
def test_invalid_contrast_setting_is_refused_naming_the_key(bad):
    with pytest.raises(InputError, match="predict.contrast_hu"):
        check_contrast_hu(bad)
    with pytest.raises(InputError, match="predict.contrast_hu"):
        candidates_from_probability(np.zeros((4, 4, 4), dtype=np.float32), GEOMETRY, contrast_hu=bad)
