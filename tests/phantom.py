"""A small analytic chest phantom for the preprocessing tests (no dependency on noduleflow.synthetic).

Body (elliptic cylinder, 0 HU, fat rim -100 HU), two lung ellipsoids (-850 HU), a trachea from the
top of the scan splitting into two main bronchi (-1000 HU), vessels (+20 HU tubes inside the lungs),
spherical nodules (+20 HU) including one juxta-pleural nodule sunk into the lateral chest wall.
Partial volume along z: every slice averages ``z_supersample`` thin sub-slices. World mm (x, y, z),
arrays (z, y, x); voxel centre i at origin + i * spacing (identity direction).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from noduleflow.io import Geometry, write_image


@dataclass
class Phantom:
    image: np.ndarray            # int16 HU (z, y, x)
    lung: np.ndarray             # uint8 true lung (z, y, x): both lungs incl. vessels/nodules, no airways
    labels: np.ndarray           # uint8 nodule ids (z, y, x), id = row order + 1
    geometry: Geometry
    nodules: pd.DataFrame        # LUNA16 rows (seriesuid, coordX, coordY, coordZ, diameter_mm)
    uid: str
    kinds: list[str] = field(default_factory=list)   # per nodule: parenchymal | juxta_pleural | small


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) of points p (..., 3) to the segment a-b."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def make_phantom(shape_zyx=(40, 160, 160), spacing_xyz=(0.8, 0.8, 2.5), origin_xyz=(-61.3, -170.2, -312.5),
                 uid: str = "1.2.3.4", seed: int = 0, noise_hu: float = 15.0, z_supersample: int = 3,
                 small_nodule: bool = True) -> Phantom:
    """Build the phantom; the lungs are sized relative to the field of view."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape_zyx
    sx, sy, sz = spacing_xyz
    ox, oy, oz = origin_xyz
    ext = np.array([nx * sx, ny * sy, nz * sz])
    centre = np.array([ox, oy, oz]) + (np.array([nx, ny, nz]) - 1) / 2 * np.array(spacing_xyz)
    cx, cy, cz = centre
    X, Y, Z = ext
    lung_axes = np.array([0.17 * X, 0.26 * Y, 0.42 * Z])
    lung_centres = [np.array([cx - 0.21 * X, cy, cz - 0.1 * Z]), np.array([cx + 0.21 * X, cy, cz - 0.1 * Z])]
    carina = np.array([cx, cy - 0.02 * Y, cz + 0.12 * Z])
    trachea_top = np.array([cx, cy - 0.02 * Y, oz + (nz + 1) * sz])
    bronchus_ends = [c + np.array([0.3 * lung_axes[0] * (1 if c[0] < cx else -1), 0.0, 0.2 * lung_axes[2]])
                     for c in lung_centres]
    airway_r = float(np.clip(0.045 * X, 5.0, 9.0))
    bronchus_r = float(np.clip(0.03 * X, 3.5, 6.0))

    # nodules: parenchymal, juxta-pleural (lateral wall of the right-hand lung), optionally a small one
    r_par = float(np.clip(0.035 * X, 4.0, 6.0))
    par = lung_centres[0] + np.array([0.2 * lung_axes[0], 0.3 * lung_axes[1], -0.25 * lung_axes[2]])
    r_jp = float(np.clip(0.04 * X, 4.5, 7.0))
    jp_z = lung_centres[1][2] - 0.1 * lung_axes[2]      # lateral pleura of the right-hand lung
    jp_x = lung_centres[1][0] + lung_axes[0] * np.sqrt(1 - 0.1 ** 2) - 0.75 * r_jp   # sunk 0.25 r
    jp = np.array([jp_x, cy, jp_z])
    spheres = [(par, r_par, "parenchymal"), (jp, r_jp, "juxta_pleural")]
    if small_nodule:
        sm = lung_centres[1] + np.array([-0.3 * lung_axes[0], -0.35 * lung_axes[1], 0.2 * lung_axes[2]])
        spheres.append((sm, 2.0, "small"))
    vessels = []
    for c, side in zip(lung_centres, (-1, 1)):
        hilum = c + np.array([-side * 0.7 * lung_axes[0], 0.0, 0.1 * lung_axes[2]])
        for d in ([0.9, 0.5, 0.3], [0.8, -0.6, -0.2], [0.6, 0.1, 0.7]):
            end = hilum + np.array([side * d[0] * lung_axes[0] * 1.3, d[1] * lung_axes[1], d[2] * lung_axes[2]])
            vessels.append((hilum, end, 1.8))

    def field_at(zs: np.ndarray):
        """HU, lung truth, labels at world z positions zs (one slice each), voxel centres in x, y."""
        xs = ox + np.arange(nx) * sx
        ys = oy + np.arange(ny) * sy
        P = np.stack(np.meshgrid(zs, ys, xs, indexing="ij")[::-1], axis=-1)  # (z, y, x, 3) as x,y,z
        body_e = ((P[..., 0] - cx) / (0.45 * X)) ** 2 + ((P[..., 1] - cy) / (0.36 * Y)) ** 2
        hu = np.full(P.shape[:3], -1000.0)
        hu[body_e < 1] = -100.0
        hu[body_e < 0.85] = 0.0
        lung = np.zeros(P.shape[:3], bool)
        for c in lung_centres:
            lung |= (((P - c) / lung_axes) ** 2).sum(-1) < 1
        hu[lung] = -850.0
        for a, b, r in vessels:
            v = (_segment_distance(P, a, b) < r) & lung
            hu[v] = 20.0
        airway = _segment_distance(P, trachea_top, carina) < airway_r
        for end in bronchus_ends:
            airway |= _segment_distance(P, carina, end) < bronchus_r
        hu[airway] = -1000.0
        labels = np.zeros(P.shape[:3], np.uint8)
        for i, (c, r, _) in enumerate(spheres):
            s = np.linalg.norm(P - c, axis=-1) < r
            hu[s] = 20.0
            labels[s & lung] = i + 1
        return hu, lung | (labels > 0), labels

    zc = oz + np.arange(nz) * sz
    hu = np.zeros((nz, ny, nx), dtype=np.float32)
    lung = np.zeros((nz, ny, nx), dtype=bool)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    step = max(1, 2_000_000 // (nx * ny))     # slices per block: bounded memory at full size
    for z0 in range(0, nz, step):
        block = slice(z0, min(z0 + step, nz))
        for k in range(z_supersample):
            dz = ((k + 0.5) / z_supersample - 0.5) * sz
            hu[block] += field_at(zc[block] + dz)[0] / z_supersample
        _, lung[block], labels[block] = field_at(zc[block])
    hu += rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    geometry = Geometry(tuple(map(float, spacing_xyz)), tuple(map(float, origin_xyz)))
    rows = pd.DataFrame({"seriesuid": uid, "coordX": [c[0] for c, _, _ in spheres],
                         "coordY": [c[1] for c, _, _ in spheres], "coordZ": [c[2] for c, _, _ in spheres],
                         "diameter_mm": [2 * r for _, r, _ in spheres]})
    return Phantom(np.clip(np.rint(hu), -1024, 3000).astype(np.int16), lung.astype(np.uint8), labels,
                   geometry, rows, uid, [k for _, _, k in spheres])


def write_phantom(ph: Phantom, folder: Path) -> dict[str, Path]:
    """Write scan (.mhd/.raw), exact labels, true lung and a per-scan annotation CSV into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"scan": folder / f"{ph.uid}.mhd", "mask": folder / f"{ph.uid}_mask.mha",
             "lung": folder / f"{ph.uid}_lung.mha", "annotations": folder / "annotations.csv"}
    write_image(ph.image, ph.geometry, paths["scan"])
    write_image(ph.labels, ph.geometry, paths["mask"])
    write_image(ph.lung, ph.geometry, paths["lung"])
    ph.nodules.to_csv(paths["annotations"], index=False)
    return paths


@functools.lru_cache(maxsize=8)
def cached_phantom(shape_zyx=(40, 160, 160), spacing_xyz=(0.8, 0.8, 2.5), origin_xyz=(-61.3, -170.2, -312.5),
                   uid: str = "1.2.3.4", seed: int = 0, z_supersample: int = 3) -> Phantom:
    """:func:`make_phantom`, built once per session for each argument set (do not modify it)."""
    return make_phantom(shape_zyx, spacing_xyz, origin_xyz, uid=uid, seed=seed, z_supersample=z_supersample)


#: a small synthetic cohort rich in juxta-pleural nodules (2.0 and 2.5 mm slices, 3-32 mm nodules)
SYNTHETIC_CFG = {"seed": 11, "min_nodules": 2, "max_nodules": 4,
                 "location_mix": {"parenchymal": 0.2, "juxta_pleural": 0.6, "juxta_vascular": 0.2}}
SYNTHETIC_SCANS = 4


@functools.lru_cache(maxsize=SYNTHETIC_SCANS)
def cached_synthetic_scan(index: int):
    """(uid, plan, rendered scan) of scan ``index`` of the SYNTHETIC_CFG cohort, made once per session."""
    from noduleflow.synthetic import cohort_uids, make_scan

    uid = cohort_uids(SYNTHETIC_SCANS, SYNTHETIC_CFG["seed"])[index]
    plan, scan = make_scan(uid, SYNTHETIC_CFG)
    return uid, plan, scan


def write_synthetic(index: int, folder: Path) -> dict:
    """Write synthetic scan ``index`` in the cohort layout (subset0/, masks/, lungs/, nodules/)."""
    from noduleflow.io import write_csv_atomic

    uid, plan, scan = cached_synthetic_scan(index)
    paths = {"uid": uid, "scan": folder / "subset0" / f"{uid}.mhd", "mask": folder / "masks" / f"{uid}.mha",
             "lungs": folder / "lungs" / f"{uid}.mha", "annotations": folder / "nodules" / f"{uid}.csv",
             "locations": [n.location for n in plan.nodules]}
    write_image(scan.image, scan.geometry, paths["scan"])
    write_image(scan.labels, scan.geometry, paths["mask"])
    write_image(scan.lungs, scan.geometry, paths["lungs"])
    write_csv_atomic(scan.annotations, paths["annotations"])
    return paths
