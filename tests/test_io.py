"""noduleflow.io: scan validation, annotation CSVs, atomic writes, world <-> voxel, grid checks."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from noduleflow.io import (Geometry, InputError, atomic_path, check_same_grid, read_annotations, read_image,
                           read_scan, validate_mhd, voxel_to_world, world_to_voxel, write_image)

GEOMETRY = Geometry((0.7, 0.75, 2.5), (-180.5, -160.25, -320.0))


@pytest.fixture()
def scan(tmp_path) -> Path:
    """A small valid .mhd/.raw scan with non-zero origin and anisotropic spacing."""
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000
    path = tmp_path / "scan.mhd"
    write_image(array, GEOMETRY, path)
    return path


def _edit_header(path: Path, key: str, value: str | None) -> None:
    """Set (or with None remove) a header field; a new field goes before ElementDataFile."""
    lines, found = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("=")[0].strip()
        if name == key:
            found = True
            if value is None:
                continue
            line = f"{key} = {value}"
        if name == "ElementDataFile" and not found and value is not None:
            lines.append(f"{key} = {value}")
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_valid_scan_reads_back_with_its_geometry(scan):
    array, geometry = read_scan(scan)
    assert array.dtype == np.int16 and array.shape == (4, 5, 6)
    assert array[0, 0, 0] == -1000 and array[-1, -1, -1] == -1000 + 119
    assert np.allclose(geometry.spacing, GEOMETRY.spacing) and np.allclose(geometry.origin, GEOMETRY.origin)


def test_truncated_raw_is_rejected_naming_the_file(scan):
    raw = scan.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"scan\.raw.*truncated"):
        read_scan(scan)


def test_missing_raw_is_rejected_naming_the_file(scan):
    scan.with_suffix(".raw").unlink()
    with pytest.raises(InputError, match=r"scan\.mhd.*scan\.raw is missing"):
        read_scan(scan)


def test_unsupported_element_type_is_rejected(scan):
    _edit_header(scan, "ElementType", "MET_LONG_LONG_ARRAY")
    with pytest.raises(InputError, match=r"scan\.mhd.*unsupported ElementType"):
        validate_mhd(scan)


def test_non_3d_header_is_rejected(scan):
    _edit_header(scan, "NDims", "2")
    with pytest.raises(InputError, match=r"scan\.mhd.*only 3-D"):
        read_scan(scan)


@pytest.mark.parametrize("key, value, message", [
    ("ElementSpacing", "0.7 0 2.5", "must be positive"),
    ("ElementSpacing", "0.7 0.7", "not 3 finite numbers"),
    ("Offset", "a b c", "not 3 numbers"),
    ("ElementNumberOfChannels", "3", "only scalar"),
    ("DimSize", "6 5", "not three positive integers"),
])
def test_bad_header_fields_are_rejected(scan, key, value, message):
    _edit_header(scan, key, value)
    with pytest.raises(InputError, match=rf"scan\.mhd.*{message}"):
        validate_mhd(scan)


def test_header_size_is_taken_into_account(scan):
    raw = scan.with_suffix(".raw")
    raw.write_bytes(b"\0" * 16 + raw.read_bytes())
    with pytest.raises(InputError, match="truncated or oversized"):
        validate_mhd(scan)
    text = scan.read_text(encoding="utf-8").replace("ElementDataFile", "HeaderSize = 16\nElementDataFile")
    scan.write_text(text, encoding="utf-8")
    validate_mhd(scan)
    array, _ = read_scan(scan)
    assert array[0, 0, 0] == -1000


def test_unreadable_or_missing_files_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nothere.mhd"):
        read_scan(tmp_path / "nothere.mhd")
    with pytest.raises(InputError, match="nothere.mha"):
        read_image(tmp_path / "nothere.mha")


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "annotations.csv"
    path.write_text(text, encoding="utf-8")
    return path


HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


@pytest.mark.parametrize("body, message", [
    ('1.2,1,2,3,5\n1.3,1,2,"unterminated\n', "malformed CSV"),
    ("1.2,1,2,3,5,6,7\n", "malformed CSV"),
    ("1.2,1,2,3,0\n", "diameter_mm = 0.0 must be positive"),
    ("1.2,1,2,3,-4\n", "must be positive"),
    ("1.2,1,x,3,4\n", "coordY = 'x' is not a number"),
    ("1.2,1,2,,4\n", "coordZ"),
])
def test_bad_annotation_csv_names_file_and_problem(tmp_path, body, message):
    path = _csv(tmp_path, HEADER + body)
    with pytest.raises(InputError, match=message) as info:
        read_annotations(path)
    assert str(path) in str(info.value)


def test_annotation_csv_with_missing_column_or_empty_file(tmp_path):
    with pytest.raises(InputError, match="missing column"):
        read_annotations(_csv(tmp_path, "seriesuid,coordX,coordY,coordZ\n1.2,1,2,3\n"))
    with pytest.raises(InputError, match="malformed CSV"):
        read_annotations(_csv(tmp_path, ""))


def test_annotations_keep_row_order_and_uid_strings(tmp_path):
    path = _csv(tmp_path, HEADER + "1.20,1,2,3,5\n1.3,4,5,6,7\n1.20,7,8,9,4.5\n")
    table = read_annotations(path)
    assert table["seriesuid"].tolist() == ["1.20", "1.3", "1.20"]   # not parsed as floats
    assert table["diameter_mm"].tolist() == [5.0, 7.0, 4.5]


def test_world_voxel_round_trip_with_direction():
    theta = np.deg2rad(20)
    direction = (np.cos(theta), -np.sin(theta), 0, np.sin(theta), np.cos(theta), 0, 0, 0, 1)
    geometry = Geometry((0.7, 0.8, 2.5), (-100.0, 50.0, -300.0), tuple(map(float, direction)))
    world = np.array([[-90.0, 60.0, -280.0], [10.0, -20.0, -150.5]])
    index = world_to_voxel(world, geometry)
    assert np.allclose(voxel_to_world(index, geometry), world)
    # voxel (z, y, x) = (2, 0, 0) is two slices up from the origin
    assert np.allclose(voxel_to_world([2, 0, 0], geometry), [-100.0, 50.0, -295.0])


def test_image_round_trip_keeps_geometry_and_compression_level(tmp_path):
    array = np.random.default_rng(0).integers(-1000, 400, (3, 4, 5)).astype(np.int16)
    for level in (-1, 1, 9):
        path = tmp_path / f"a{level}.mha"
        write_image(array, GEOMETRY, path, compression_level=level)
        back, geometry = read_image(path)
        assert np.array_equal(back, array)
        assert np.allclose(geometry.origin, GEOMETRY.origin) and np.allclose(geometry.spacing, GEOMETRY.spacing)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.mha"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial", encoding="utf-8")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_termination_while_the_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM becomes SystemExit (logs.logging_to); it may land right after the temporary file
    appears on disk, before any Python name holds it: that file must still be removed."""
    import noduleflow.io as nf_io

    real_open = nf_io.os.open

    def open_then_terminate(*args, **kwargs):
        real_open(*args, **kwargs)
        raise SystemExit(143)

    monkeypatch.setattr(nf_io.os, "open", open_then_terminate)
    with pytest.raises(SystemExit):
        with atomic_path(tmp_path / "out.mha"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_the_folder_whole_or_not_at_all(tmp_path):
    from noduleflow.io import atomic_dir

    target = tmp_path / "maps"
    with atomic_dir(target) as tmp:
        (tmp / "a.mha").write_text("a", encoding="utf-8")
    assert sorted(p.name for p in target.iterdir()) == ["a.mha"]
    with pytest.raises(SystemExit):
        with atomic_dir(target) as tmp:
            (tmp / "b.mha").write_text("b", encoding="utf-8")
            raise SystemExit(143)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]
    assert sorted(p.name for p in target.iterdir()) == ["a.mha"]
    with atomic_dir(target) as tmp:
        (tmp / "b.mha").write_text("b", encoding="utf-8")
    assert sorted(p.name for p in target.iterdir()) == ["b.mha"]


def test_check_same_grid_names_the_file(tmp_path):
    other = Geometry(GEOMETRY.spacing, (GEOMETRY.origin[0] + 1, *GEOMETRY.origin[1:]))
    check_same_grid((2, 3, 4), GEOMETRY, (2, 3, 4), GEOMETRY, tmp_path / "m.mha")
    with pytest.raises(InputError, match=r"m\.mha: origin"):
        check_same_grid((2, 3, 4), GEOMETRY, (2, 3, 4), other, tmp_path / "m.mha")
    with pytest.raises(InputError, match=r"m\.mha: size 2x3x5"):
        check_same_grid((2, 3, 4), GEOMETRY, (2, 3, 5), GEOMETRY, tmp_path / "m.mha")


def test_annotations_dataframe_columns_are_floats(tmp_path):
    frame = pd.DataFrame({"seriesuid": ["a"], "coordX": [1], "coordY": [2], "coordZ": [3], "diameter_mm": [4]})
    path = tmp_path / "a.csv"
    frame.to_csv(path, index=False)
    table = read_annotations(path)
    assert table[["coordX", "coordY", "coordZ", "diameter_mm"]].dtypes.eq(float).all()
