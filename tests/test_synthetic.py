"""The synthetic chest-CT cohort (noduleflow.synthetic): determinism, geometry, labels, anatomy, config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from noduleflow.io import InputError, read_annotations, read_image, read_mhd_header, read_scan, world_to_voxel
from noduleflow.runconfig import ConfigError
from noduleflow.synthetic import (THICKNESSES_MM, cohort_uids, merge_annotations, plan_scan, render_scan,
                                  sample_nodule_diameters, scan_index, synthesize_cohort, synthesize_scan)

#: small scans (128 x 128 in-plane, same physical size as the real ones) keep this file fast
SMALL = {"seed": 11, "full_size": False, "min_nodules": 2, "max_nodules": 4, "matrix_size": 128}


def _files(root, uid):
    return {"scan": root / "subset0" / f"{uid}.mhd", "raw": root / "subset0" / f"{uid}.raw",
            "mask": root / "masks" / f"{uid}.mha", "lungs": root / "lungs" / f"{uid}.mha",
            "nodules": root / "nodules" / f"{uid}.csv"}


def _write(root, uid, cfg):
    f = _files(root, uid)
    synthesize_scan(uid, cfg, out_scan=f["scan"], out_mask=f["mask"], out_lungs=f["lungs"], out_nodules=f["nodules"])
    return f


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """Six small scans written as the workflow writes them, with their plans."""
    root = tmp_path_factory.mktemp("cohort")
    uids = synthesize_cohort(dict(SMALL, n_scans=6), output=root)
    return root, uids


def test_same_seed_gives_identical_bytes_and_a_proper_mhd_pair(tmp_path):
    uid = cohort_uids(2, SMALL["seed"])[1]
    first, second = _write(tmp_path / "a", uid, SMALL), _write(tmp_path / "b", uid, dict(SMALL, output="elsewhere"))
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key
    header = read_mhd_header(first["scan"])
    assert header["ElementDataFile"] == f"{uid}.raw"
    assert header["ElementType"] == "MET_SHORT"
    assert header["TransformMatrix"].split() == ["1", "0", "0", "0", "1", "0", "0", "0", "1"]
    assert all(float(v) != 0 for v in header["Offset"].split())
    nx, ny, nz = map(int, header["DimSize"].split())
    assert first["raw"].stat().st_size == nx * ny * nz * 2
    image, geometry = read_scan(first["scan"])
    assert image.dtype == np.int16 and image.shape == (nz, ny, nx)
    assert -1100 < np.median(image) < 200 and image.max() > 300  # air, soft tissue and bone
    other = _write(tmp_path / "c", cohort_uids(2, 12)[1], dict(SMALL, seed=12))
    assert other["raw"].read_bytes() != first["raw"].read_bytes()


def test_growing_the_cohort_keeps_earlier_scans(tmp_path):
    small = dict(SMALL, min_nodules=0, max_nodules=1)
    two = synthesize_cohort(dict(small, n_scans=2), output=tmp_path / "two")
    three = synthesize_cohort(dict(small, n_scans=3), output=tmp_path / "three")
    assert three[:2] == two
    for uid in two:
        for key, path in _files(tmp_path / "two", uid).items():
            assert path.read_bytes() == _files(tmp_path / "three", uid)[key].read_bytes(), key
    assert [scan_index(uid, small["seed"]) for uid in three] == [0, 1, 2]
    with pytest.raises(ConfigError, match="not one of the first"):
        scan_index("1.2.3", small["seed"], max_index=50)


def test_geometry_is_like_real_scans():
    thicknesses = set()
    for index in range(12):
        plan = plan_scan(index, {"seed": 3})
        (sx, sy, sz), origin = plan.geometry.spacing, plan.geometry.origin
        assert 0.55 <= sx == sy <= 0.85
        assert plan.shape[1:] == (512, 512)
        assert sz in THICKNESSES_MM
        assert 95 <= plan.shape[0] * sz <= 105
        assert all(abs(o) > 1 for o in origin)
        assert plan.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        thicknesses.add(sz)
    assert len(thicknesses) >= 3
    full = plan_scan(0, {"seed": 3, "full_size": True})
    assert 290 <= full.shape[0] * full.slice_thickness <= 310 and full.shape[1:] == (512, 512)


def test_every_annotation_centre_lies_inside_its_own_label(small_cohort):
    root, uids = small_cohort
    table = read_annotations(root / "annotations.csv")
    assert list(table["seriesuid"].unique()) == [u for u in uids if u in set(table["seriesuid"])]
    n_checked = 0
    for uid in uids:
        rows = read_annotations(root / "nodules" / f"{uid}.csv")
        labels, geometry = read_image(root / "masks" / f"{uid}.mha")
        lungs, _ = read_image(root / "lungs" / f"{uid}.mha")
        assert labels.dtype == np.uint8 and lungs.dtype == np.uint8
        assert set(np.unique(labels)) == set(range(len(rows) + 1))
        assert np.all(lungs[labels > 0] == 1)  # nodules are part of the true lung
        for row_id, row in enumerate(rows.itertuples(), start=1):
            voxel = np.rint(world_to_voxel([row.coordX, row.coordY, row.coordZ], geometry)).astype(int)
            assert labels[tuple(voxel)] == row_id, (uid, row_id)
            n_checked += 1
    assert n_checked == len(table) >= 12


def test_nodules_fit_the_scan_do_not_overlap_and_mix_textures_and_locations():
    textures, locations = [], []
    for index in range(8):
        plan = plan_scan(index, SMALL)
        z0, z1 = plan.z_range()
        for i, a in enumerate(plan.nodules):
            assert z0 < a.center[2] - a.extent_mm and a.center[2] + a.extent_mm < z1
            for b in plan.nodules[i + 1:]:
                assert np.linalg.norm(np.subtract(a.center, b.center)) > a.extent_mm + b.extent_mm
            textures.append(a.texture)
            locations.append(a.location)
            if a.texture == "solid":
                assert -100 <= a.hu <= 100
            elif a.texture == "ground_glass":
                assert -750 <= a.hu <= -400
    assert set(locations) == {"parenchymal", "juxta_pleural", "juxta_vascular"}
    assert "solid" in textures and textures.count("solid") > len(textures) / 2
    counts = [len(plan_scan(i, dict(SMALL, min_nodules=0, max_nodules=4)).nodules) for i in range(10)]
    assert 0 in counts and max(counts) >= 3


def test_juxta_pleural_nodules_touch_the_lung_boundary(tmp_path):
    cfg = dict(SMALL, min_nodules=2, max_nodules=2, location_mix={"juxta_pleural": 1.0})
    touching = 0
    for index in range(3):
        plan = plan_scan(index, cfg)
        scan = render_scan(plan)
        for label, nodule in enumerate(plan.nodules, start=1):
            if nodule.location != "juxta_pleural":
                continue
            own = scan.labels == label
            grown = ndimage.binary_dilation(own)
            assert np.any(grown & (scan.lungs == 0)), (index, label)  # touches the lung boundary
            assert np.all(scan.lungs[own] == 1)
            touching += 1
    assert touching >= 4


def test_diameters_follow_the_configured_distribution():
    rng = np.random.default_rng(0)
    d = sample_nodule_diameters(rng, 40_000)
    assert d.min() >= 3.0 and d.max() <= 32.0
    p05, p50, p95 = np.quantile(d, [0.05, 0.5, 0.95])
    assert p05 == pytest.approx(5.6, rel=0.03)
    assert p50 == pytest.approx(9.2, rel=0.03)
    assert p95 == pytest.approx(28.0, rel=0.03)
    assert np.mean(d < 4.0) < 0.03  # nodules are mostly >= 4 mm
    other = sample_nodule_diameters(np.random.default_rng(1), 40_000, (4, 6, 10, 20, 25))
    assert np.quantile(other, 0.5) == pytest.approx(10, rel=0.03) and other.min() >= 4 and other.max() <= 25
    # the planned nodules use it: pooled over many scans, the median is near the configured one
    planned = [n.diameter_mm for i in range(15) for n in plan_scan(i, dict(SMALL, min_nodules=4)).nodules]
    assert len(planned) >= 55
    assert 7.5 < np.median(planned) < 11.5 and min(planned) >= 3.0


def test_some_vessels_look_like_nodules_in_size_and_attenuation():
    plan = plan_scan(0, {"seed": 5})
    v = plan.vessels
    z0, z1 = plan.z_range()
    mid = 0.5 * (v.start + v.end)
    inside = (mid[:, 2] > z0 + 5) & (mid[:, 2] < z1 - 5)
    big = inside & (v.diameter_mm >= 3.0) & (v.diameter_mm <= 12.0) & (v.hu > -100) & (v.hu < 100)
    assert big.sum() >= 20
    # and in the rendered scan those vessels' centres have the HU of solid nodules
    scan = render_scan(plan)
    idx = np.rint(world_to_voxel(mid[big], plan.geometry)).astype(int)
    in_lung = scan.lungs[tuple(idx.T)] == 1
    values = scan.image[tuple(idx[in_lung].T)]
    assert in_lung.sum() >= 10
    assert -100 < np.median(values) < 100
    # vessels are long tubes, not blobs: median length well above their diameter
    length = np.linalg.norm(v.end - v.start, axis=1)
    assert np.median(length[big] / v.diameter_mm[big]) > 1.5
    # the true lung mask: parenchyma is air-like, the trachea is not lung
    assert np.median(scan.image[scan.lungs == 1]) < -700
    trachea = next(p for p, _ in plan.anatomy.main_airways if p.name == "trachea")
    top = np.array(trachea.a)
    top[2] = z1 - 2
    t_idx = np.rint(world_to_voxel(top, plan.geometry)).astype(int)
    assert scan.lungs[tuple(t_idx)] == 0 and scan.image[tuple(t_idx)] < -800


@pytest.mark.parametrize(("override", "key"), [
    ({"max_nodules": -1}, "synthetic.max_nodules"),
    ({"min_nodules": 3, "max_nodules": 2}, "synthetic.min_nodules"),
    ({"diameter_quantiles_mm": [3, 5.6, 9.2, 28, 80]}, "synthetic.diameter_quantiles_mm"),
    ({"diameter_quantiles_mm": [3, 9.2, 5.6, 28, 32]}, "synthetic.diameter_quantiles_mm"),
    ({"matrix_size": 16}, "synthetic.matrix_size"),
    ({"noise_hu": [40, 10]}, "synthetic.noise_hu"),
    ({"seed": -4}, "synthetic.seed"),
    ({"texture_mix": {"solid": 1, "calcified": 1}}, "synthetic.texture_mix"),
    ({"n_scans": 0}, "synthetic.n_scans"),
    ({"nodules": 3}, "synthetic.nodules"),
])
def test_a_bad_config_value_fails_naming_the_key(tmp_path, override, key):
    uid = cohort_uids(1, SMALL["seed"])[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _write(tmp_path, uid, dict(SMALL, **override))
    assert not any(tmp_path.rglob("*.*"))  # nothing written


def test_merge_annotations_keeps_order_and_writes_a_header_when_empty(tmp_path):
    cols = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    a, b, empty = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "e.csv"
    pd.DataFrame([["u2", 1.0, 2.0, 3.0, 5.0]], columns=cols).to_csv(a, index=False)
    pd.DataFrame([["u1", 4.0, 5.0, 6.0, 7.0], ["u1", 7.0, 8.0, 9.0, 9.5]], columns=cols).to_csv(b, index=False)
    pd.DataFrame(columns=cols).to_csv(empty, index=False)
    merge_annotations([a, empty, b], tmp_path / "all.csv")
    merged = read_annotations(tmp_path / "all.csv")
    assert merged["seriesuid"].tolist() == ["u2", "u1", "u1"]
    assert merged["diameter_mm"].tolist() == [5.0, 7.0, 9.5]
    merge_annotations([empty], tmp_path / "none.csv")
    assert (tmp_path / "none.csv").read_text(encoding="utf-8").strip() == ",".join(cols)


def test_merge_annotations_writes_the_texture_stratum_of_every_scan(tmp_path):
    cols = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "texture", "location"]
    files = {"1.9": [["1.9", 1, 2, 3, 5.0, "solid", "parenchymal"], ["1.9", 4, 5, 6, 9.0, "ground_glass", "parenchymal"]],
             "1.2": [["1.2", 1, 2, 3, 5.0, "solid", "juxta_pleural"]], "1.5": []}
    for uid, rows in files.items():
        pd.DataFrame(rows, columns=cols).to_csv(tmp_path / f"{uid}.csv", index=False)
    merge_annotations([tmp_path / f"{u}.csv" for u in files], tmp_path / "all.csv", tmp_path / "strata.csv")
    strata = pd.read_csv(tmp_path / "strata.csv", dtype=str)
    assert strata.values.tolist() == [["1.2", "solid"], ["1.5", "none"], ["1.9", "subsolid"]]
    assert list(pd.read_csv(tmp_path / "all.csv").columns) == cols[:5]  # annotations.csv stays LUNA16
    pd.DataFrame([files["1.2"][0][:5]], columns=cols[:5]).to_csv(tmp_path / "1.2.csv", index=False)
    with pytest.raises(InputError, match=r"1\.2\.csv: no texture column"):
        merge_annotations([tmp_path / "1.2.csv"], tmp_path / "all2.csv", tmp_path / "strata2.csv")
    assert not (tmp_path / "strata2.csv").exists() and not (tmp_path / "all2.csv").exists()


def _outside_mediastinum_mm(plan, node) -> float:
    """Signed distance (mm, > 0 outside) of a lymph node's centre to the mediastinum outlined by every
    other structure that keeps the lungs away (fat margin > 0)."""
    return min(float(p.sdf(*node.a)) - p.margin for p in plan.anatomy.prims
               if p.margin > 0 and not p.name.startswith("lymph_node"))


def test_lymph_nodes_sit_in_the_mediastinum_never_free_in_the_lung():
    """An unannotated ball of soft tissue surrounded by aerated lung is a nodule in all but name;
    every mediastinal lymph node is centred inside or on the mediastinum's boundary, and on a full
    scan where one used to float, it is joined to the mediastinum's soft tissue (not an island)."""
    cfg = {"seed": 20210521}
    nodes = [(plan, p) for i in range(20) for plan in [plan_scan(i, cfg)]
             for p in plan.anatomy.prims if p.name.startswith("lymph_node")]
    assert len(nodes) > 40
    assert max(_outside_mediastinum_mm(plan, p) for plan, p in nodes) <= 0.0
    plan = plan_scan(6, cfg)  # its lymph_node_0 was drawn ~8 mm lateral of the mediastinum
    scan = render_scan(plan)
    components, _ = ndimage.label(scan.lungs == 0)
    body = np.bincount(components.ravel())[1:].argmax() + 1
    for node in (p for p in plan.anatomy.prims if p.name.startswith("lymph_node")):
        index = np.round((np.asarray(node.a) - plan.geometry.origin) / plan.geometry.spacing).astype(int)
        if 0 <= index[2] < scan.lungs.shape[0]:
            assert components[index[2], index[1], index[0]] == body, node.name


def test_only_juxta_vascular_nodules_touch_vessels_and_only_thin_ones():
    """A nodule drawn as parenchymal or juxta-pleural keeps >= 1 mm of parenchyma from every vessel
    thicker than those juxta-vascular nodules sit on (r > 2.8 mm: hilar arteries and veins); a
    juxta-vascular one touches a vessel of radius 0.8-2.8 mm."""
    cfg = {"seed": 20210521}
    checked = 0
    for index in range(20):
        plan = plan_scan(index, cfg)
        v = plan.vessels
        for nodule in plan.nodules:
            c = np.asarray(nodule.center)
            ab = v.end - v.start
            t = np.clip(((c - v.start) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-9), 0, 1)
            r = v.r0 + t * (v.r1 - v.r0)
            gap = np.linalg.norm(v.start + t[:, None] * ab - c, axis=1) - r - nodule.radius_mm
            if nodule.location == "juxta_vascular":
                assert gap[(r >= 0.7) & (r <= 2.9)].min() < 0.5, (index, nodule)
            else:
                assert gap[np.maximum(v.r0, v.r1) > 2.8].min() >= 1.0 - 1e-6, (index, nodule)
                checked += 1
    assert checked >= 30


def test_nodules_keep_clear_of_the_first_and_last_slice():
    """A chest slab cuts the lungs at its first and last slice; every nodule (its whole extent, lobes
    and spicules included) keeps >= 12 mm from there, in slabs and in full-size scans alike."""
    for cfg in ({"seed": 20210521}, {"seed": 7, "max_nodules": 6}):
        gaps = []
        for index in range(20):
            plan = plan_scan(index, cfg)
            z_first, z_last = plan.z_range()
            for nodule in plan.nodules:
                gaps.append(min(nodule.center[2] - nodule.extent_mm - z_first,
                                z_last - nodule.center[2] - nodule.extent_mm))
        assert len(gaps) >= 30 and min(gaps) >= 12.0, sorted(gaps)[:3]
