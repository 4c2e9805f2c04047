"""noduleflow.lidc: LIDC readers' XML -> LUNA16-style annotations, excluded rows, consensus labels.

Synthetic unit tests (outline convention, slice matching, clustering, consensus) and one real scan,
LIDC-IDRI-0001 with its readers' XML, checked against its rows in the real LUNA16 lists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from realct import realct_root

from noduleflow import lidc
from noduleflow.io import Geometry, InputError, read_annotations, read_image

UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
LUNA_CENTRE = np.array([56.20840547, 86.34341278, -115.8675792])
LUNA_DIAMETER = 23.35064438


# --------------------------------------------------------------------------- synthetic


def square(x0: int, y0: int, n: int) -> np.ndarray:
    """Outline (x, y) of a square of side n pixels, corner (x0, y0), drawn clockwise and closed."""
    top = [(x0 + i, y0) for i in range(n)]
    right = [(x0 + n - 1, y0 + i) for i in range(1, n)]
    bottom = [(x0 + n - 1 - i, y0 + n - 1) for i in range(1, n)]
    left = [(x0, y0 + n - 1 - i) for i in range(1, n)]
    return np.array(top + right + bottom + left, dtype=np.int64)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 13])
def test_square_outline_encloses_n_minus_2_squared(n):
    mask = lidc.fill_contour(square(10, 20, n), (64, 64))
    assert mask.sum() == (n - 2) ** 2
    assert mask[21:19 + n - 1, 11:9 + n - 1].all()  # the interior, boundary excluded
    assert not mask[20, :].any() and not mask[:, 10].any()
    hole = lidc.fill_contour(square(10, 20, n), (64, 64), hole=True)
    assert hole.sum() == n * n  # a hole removes its outline too


def test_outline_off_the_slice_is_clipped():
    mask = lidc.fill_contour(square(-3, -3, 8), (16, 16))
    assert mask.sum() == 4 * 4  # interior rows/cols -2..3, only 0..3 on the slice


def synthetic_slices(n_slices: int = 6, spacing_z: float = 2.5) -> lidc.SeriesSlices:
    geometry = Geometry((0.5, 0.5, spacing_z), (-10.0, -20.0, -100.0))
    z = -100.0 + spacing_z * np.arange(n_slices)
    return lidc.SeriesSlices(Path("series"), "1.2.3", tuple(f"{k}.dcm" for k in range(n_slices)),
                             tuple(f"1.2.3.{k}" for k in range(n_slices)), z, (n_slices, 40, 40), geometry)


def nodule(reader: int, rois: list[lidc.Roi]) -> lidc.ReaderMark:
    return lidc.ReaderMark(reader, str(reader), lidc.NODULE, f"n{reader}", tuple(rois), 5, "reads.xml")


def test_roi_slice_by_sop_uid_then_z_position():
    slices = synthetic_slices()
    points = square(0, 0, 5)
    assert lidc.roi_slice_index(lidc.Roi("1.2.3.4", -50.0, True, points), slices, "r.xml") == 4  # uid wins
    assert lidc.roi_slice_index(lidc.Roi("9.9", -94.0, True, points), slices, "r.xml") == 2  # nearest z
    with pytest.raises(InputError, match=r"r\.xml.*9\.9"):
        lidc.roi_slice_index(lidc.Roi("9.9", -86.0, True, points), slices, "r.xml")  # 1.5 mm > half a slice


def test_mark_voxels_holes_centre_and_diameter():
    slices = synthetic_slices()
    outer = lidc.Roi("1.2.3.2", None, True, square(10, 10, 12))  # 10 x 10 inside
    hole = lidc.Roi("1.2.3.2", None, False, square(14, 14, 4))  # removes 4 x 4
    by_z = lidc.Roi("", -92.5, True, square(10, 10, 12))  # no uid: slice 3 by its z (-100 + 3 x 2.5)
    mark = nodule(0, [outer, hole, by_z])
    voxels = lidc.mark_voxels(mark, slices)
    assert len(voxels) == 100 - 16 + 100
    assert set(voxels[:, 0]) == {2, 3}
    measured = lidc.measure_mark(mark, slices)
    centre = lidc.voxel_to_world(((84 * 2 + 100 * 3) / 184, 15.5, 15.5), slices.geometry)
    np.testing.assert_allclose(measured.centre, centre, atol=1e-9)  # the hole is centred
    volume = 184 * 0.5 * 0.5 * 2.5
    assert measured.diameter == pytest.approx((6 * volume / np.pi) ** (1 / 3))
    assert lidc.mark_diameter(mark, voxels, slices, "max_inplane") == pytest.approx(11 * np.sqrt(2) * 0.5)


def test_clusters_merge_overlapping_marks_of_different_readers():
    centres = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert lidc.cluster_marks(centres, [6.0, 6.0, 5.0], [0, 1, 2]) == [[0, 1, 2]]


def test_clusters_keep_far_marks_apart():
    centres = np.array([[0.0, 0.0, 0.0], [6.1, 0.0, 0.0]])
    assert lidc.cluster_marks(centres, [6.0, 6.0], [0, 1]) == [[0], [1]]  # 6.1 mm >= 3 + 3
    assert lidc.cluster_marks(centres, [6.0, 6.4], [0, 1]) == [[0, 1]]  # 6.1 mm < 3 + 3.2


def test_clusters_never_hold_two_marks_of_one_reader():
    centres = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert lidc.cluster_marks(centres, [8.0, 8.0], ["a", "a"]) == [[0], [1]]
    # reader 1 marked twice near reader 0's mark: the nearer mark joins, the other stays apart,
    # whatever the input order
    centres = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert lidc.cluster_marks(centres, [8.0, 8.0, 8.0], [0, 1, 1]) == [[0, 2], [1]]
    assert lidc.cluster_marks(centres[[2, 1, 0]], [8.0] * 3, [1, 1, 0]) == [[0, 2], [1]]
    # a chain a-b-c where a and c are the same reader: c cannot join a's cluster through b
    centres = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [6.5, 0.0, 0.0]])
    assert lidc.cluster_marks(centres, [4.0] * 3, [0, 1, 0]) == [[0, 1], [2]]


def test_consensus_keeps_voxels_of_half_the_readers():
    def measured(voxels):
        return lidc.MeasuredMark(nodule(0, []), np.array(voxels, dtype=np.int64), np.zeros(3), 1.0)

    three = [measured([(0, 0, 0), (0, 0, 1), (0, 0, 2)]), measured([(0, 0, 1), (0, 0, 2)]),
             measured([(0, 0, 2), (0, 0, 3)])]
    four = three + [measured([(0, 1, 0)])]
    labels = lidc.consensus_labels([three], (1, 2, 5))
    assert labels[0, 0].tolist() == [0, 1, 1, 0, 0]  # 1/3 no, 2/3 and 3/3 yes
    labels = lidc.consensus_labels([four], (1, 2, 5))
    assert labels[0, 0].tolist() == [0, 1, 1, 0, 0]  # 2/4 yes, 1/4 no
    labels = lidc.consensus_labels([[measured([(0, 0, 4)])], three], (1, 2, 5))
    assert labels[0, 0].tolist() == [0, 2, 2, 0, 1]


# --------------------------------------------------------------------------- XML errors (synthetic)


def test_bad_xml_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<LidcReadMessage><ResponseHeader>", encoding="utf-8")
    with pytest.raises(InputError, match="bad.xml.*well-formed"):
        lidc.parse_reads(bad)
    bad.write_text("<IdriReadMessage/>", encoding="utf-8")
    with pytest.raises(InputError, match="bad.xml.*root element"):
        lidc.parse_reads(bad)
    bad.write_text('<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader><SeriesInstanceUid>1.2'
                   "</SeriesInstanceUid></ResponseHeader></LidcReadMessage>")
    with pytest.raises(InputError, match="bad.xml.*no readingSession"):
        lidc.parse_reads(bad)
    with pytest.raises(InputError, match="bad.xml.*SeriesInstanceUid 1.2 is not the scan's 1.3"):
        lidc.parse_reads(bad, series_uid="1.3")
    with pytest.raises(InputError, match="missing.xml.*not found"):
        lidc.parse_reads(tmp_path / "missing.xml")


def test_series_folder_without_xml_has_no_reads(tmp_path):
    assert lidc.find_series_xml(tmp_path, "1.2.3") == []


# --------------------------------------------------------------------------- real scan


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """LIDC-IDRI-0001 derived once: (series folder, slices, result, output folder)."""
    root = realct_root()
    series_dir = next((root / "LIDC-IDRI-0001").glob(f"*/{UID}"))
    out = tmp_path_factory.mktemp("lidc")
    slices = lidc.read_series_slices(series_dir)
    result = lidc.lidc_annotations(series_dir, None, out / "annotations.csv", out / "excluded.csv",
                                   out / "mask.mha", slices=slices)
    return series_dir, slices, result, out


@pytest.fixture(scope="module")
def luna(real):
    root = realct_root() / "luna16"
    annotations = pd.read_csv(root / "annotations.csv")
    excluded = pd.read_csv(root / "annotations_excluded.csv")
    excluded = excluded[excluded.seriesuid == UID].reset_index(drop=True)
    return annotations[annotations.seriesuid == UID], excluded


def xyz(frame: pd.DataFrame) -> np.ndarray:
    return frame[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)


def test_real_series_slices_and_xml(real):
    series_dir, slices, _, _ = real
    assert slices.series_uid == UID
    assert slices.shape == (133, 512, 512)
    assert np.allclose(slices.geometry.spacing, (0.703125, 0.703125, 2.5))
    assert np.all(np.diff(slices.z_positions) > 0)  # GDCM order: slice k = file k
    assert lidc.find_series_xml(series_dir, UID) == [series_dir / "069.xml"]
    assert lidc.find_series_xml(series_dir, "1.2.3") == []
    marks = lidc.parse_reads(series_dir / "069.xml", UID)
    kinds = pd.Series([m.kind for m in marks]).value_counts().to_dict()
    assert kinds == {lidc.NON_NODULE: 13, lidc.SMALL: 9, lidc.NODULE: 4}
    assert sorted({m.reader for m in marks}) == [0, 1, 2, 3]
    assert [m.texture for m in marks if m.kind == lidc.NODULE] == [5, 5, 5, 4]


def test_real_annotation_matches_luna16(real, luna):
    _, _, result, out = real
    luna_annotations, _ = luna
    written = read_annotations(out / "annotations.csv")
    assert len(written) == 1 and written.seriesuid[0] == UID
    assert written.readers[0] == 4 and written.texture[0] == 5
    assert np.allclose(xyz(luna_annotations)[0], LUNA_CENTRE)
    distance = np.linalg.norm(xyz(written)[0] - LUNA_CENTRE)
    assert distance < 1.5, distance  # measured 0.21 mm
    assert abs(written.diameter_mm[0] - LUNA_DIAMETER) < 1.5  # measured 23.11 mm
    assert result.clusters == [[0, 1, 2, 3]]


def test_real_per_reader_diameters_match_luna16(real, luna):
    _, _, result, _ = real
    _, luna_excluded = luna
    marks = luna_excluded[luna_excluded.diameter_mm > 0]
    ours = result.marks[1:]  # LUNA16 lists readers 1..3 individually (reader 0 stands for the nodule)
    for measured, (_, row) in zip(ours, marks.iterrows()):
        assert np.linalg.norm(measured.centre - xyz(row.to_frame().T)[0]) < 0.25
        assert abs(measured.diameter - row.diameter_mm) < 0.5
    assert result.marks[3].diameter == pytest.approx(23.50013735, abs=1e-3)  # reproduced exactly


def test_real_consensus_mask(real):
    _, slices, _, out = real
    labels, geometry = read_image(out / "mask.mha")
    assert labels.dtype == np.uint8 and labels.shape == slices.shape and geometry == slices.geometry
    assert set(np.unique(labels)) == {0, 1}
    volume = (labels == 1).sum() * np.prod(geometry.spacing)
    diameter = (6 * volume / np.pi) ** (1 / 3)
    assert abs(diameter - LUNA_DIAMETER) < 2.0, diameter  # measured 23.40 mm
    zyx = np.argwhere(labels == 1).mean(axis=0)
    assert np.linalg.norm(lidc.voxel_to_world(zyx, geometry) - LUNA_CENTRE) < 1.5


def test_real_excluded_rows_match_luna16(real, luna):
    _, _, _, out = real
    _, luna_excluded = luna
    ours = read_annotations(out / "excluded.csv", allow_unknown_diameter=True)
    assert list(ours.columns) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    # every LUNA16 excluded row of the scan has one of ours within 5 mm ...
    distances = np.linalg.norm(xyz(luna_excluded)[:, None] - xyz(ours)[None], axis=-1)
    assert distances.min(axis=1).max() < 5.0
    # ... in fact the same rows in the same order: points exactly, readers' nodules within 0.25 mm
    assert len(ours) == len(luna_excluded) == 25
    row_distance = np.linalg.norm(xyz(ours) - xyz(luna_excluded), axis=1)
    point = luna_excluded.diameter_mm.to_numpy() == -1
    assert (ours.diameter_mm.to_numpy()[point] == -1).all() and point.sum() == 22
    assert row_distance[point].max() < 1e-3
    assert row_distance[~point].max() < 0.25
    diameters = ours.diameter_mm.to_numpy()[~point] - luna_excluded.diameter_mm.to_numpy()[~point]
    assert np.abs(diameters).max() < 0.5


def broken_copies(series_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """Bad variants of 069.xml: truncated, of another series, an ROI on an unknown slice."""
    text = (series_dir / "069.xml").read_text(encoding="utf-8")
    variants = {
        "truncated": text[: len(text) // 2],
        "other_series": text.replace(f"<SeriesInstanceUid>{UID}<", "<SeriesInstanceUid>1.2.840.99<"),
        "unknown_slice": text.replace(
            "<imageZposition>-125.000000 </imageZposition>\n        <imageSOP_UID>"
            "1.3.6.1.4.1.14519.5.2.1.6279.6001.110383487652933113465768208719",
            "<imageZposition>-1000.0</imageZposition>\n        <imageSOP_UID>1.2.840.12345", 1),
    }
    assert variants["unknown_slice"] != text and variants["other_series"] != text
    paths = {}
    for name, body in variants.items():
        paths[name] = tmp_path / f"{name}.xml"
        paths[name].write_text(body, encoding="utf-8")
    return paths


@pytest.mark.parametrize("variant,message", [
    ("truncated", "well-formed"),
    ("other_series", "SeriesInstanceUid 1.2.840.99 is not the scan's"),
    ("unknown_slice", "1.2.840.12345"),
])
def test_real_bad_xml_raises_and_writes_nothing(real, tmp_path, variant, message):
    series_dir, slices, _, _ = real
    xml = broken_copies(series_dir, tmp_path)[variant]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=f"{variant}.xml.*{message}"):
        lidc.lidc_annotations(series_dir, [xml], out / "a.csv", out / "e.csv", out / "m.mha", slices=slices)
    assert list(out.iterdir()) == []


def test_real_scan_without_xml_writes_empty_outputs(real, tmp_path):
    series_dir, slices, _, _ = real
    result = lidc.lidc_annotations(series_dir, [], tmp_path / "a.csv", tmp_path / "e.csv",
                                   tmp_path / "m.mha", slices=slices)
    assert len(read_annotations(tmp_path / "a.csv")) == 0
    assert len(pd.read_csv(tmp_path / "e.csv")) == 0
    labels, _ = read_image(tmp_path / "m.mha")
    assert labels.shape == slices.shape and not labels.any() and not result.labels.any()


def test_real_min_readers_moves_the_nodule_to_excluded(real, tmp_path):
    series_dir, slices, _, _ = real
    result = lidc.derive_annotations(lidc.parse_reads(series_dir / "069.xml"), slices, min_readers=5)
    assert len(result.annotations) == 0 and not result.labels.any()
    nodule_rows = result.excluded[result.excluded.diameter_mm > 0]
    assert len(nodule_rows) == 4  # the cluster's mean in place of reader 0's mark, then readers 1-3
    assert np.linalg.norm(xyz(nodule_rows)[0] - LUNA_CENTRE) < 1.5


def test_copy_of_series_folder_finds_its_xml(real, tmp_path):
    """find_series_xml skips XML of another series in the same folder."""
    series_dir, _, _, _ = real
    shutil.copy(series_dir / "069.xml", tmp_path / "069.xml")
    (tmp_path / "other.xml").write_text((series_dir / "069.xml").read_text(encoding="utf-8").replace(UID, "1.2.840.7"))
    assert lidc.find_series_xml(tmp_path, UID) == [tmp_path / "069.xml"]
