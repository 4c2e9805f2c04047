"""Synthetic chest-CT cohort in LUNA16 layout: seeded, deterministic, realistic enough to be honest.

Each scan ``i`` of a cohort with seed ``s`` depends only on ``(s, i)`` and the ``synthetic``
configuration block (never on ``n_scans``), so growing the cohort keeps the earlier scans
byte-identical. A scan is made in two steps:

* :func:`plan_scan` draws everything random: geometry (non-zero origin, in-plane spacing
  0.55-0.85 mm, slice thickness 1/1.25/2/2.5 mm, identity direction), anatomy (body wall with fat
  and muscle, ribs, spine, sternum, scapulae, mediastinum with heart, aorta, pulmonary arteries and
  veins, paratracheal and hilar lymph nodes, trachea and main bronchi, two lungs with apex and
  diaphragm domes), four branching vessel trees and two bronchial trees inside the lungs, and the
  nodules (LIDC-like diameters, solid / part-solid / ground-glass, parenchymal / juxta-pleural /
  juxta-vascular, lobulated). Lymph nodes lie in the mediastinal fat or bulge from it, never free in
  aerated lung (an unannotated soft-tissue ball in the lung would be a nodule in all but its label);
  juxta-vascular nodules sit on a vessel of radius 0.8-2.8 mm, and the others keep 1 mm of
  parenchyma from every thicker vessel (a nodule fused with a hilar artery is not parenchymal).
  Nodules keep 12 mm from the first and last slice: a slab of the chest cuts the lungs there, an
  edge that no real scan has through aerated lung.
* :func:`render_scan` turns the plan into arrays: analytic signed distances (mm) with soft edges
  one voxel wide (in-plane partial volume), rendered on sub-slices and averaged (partial volume
  from the slice thickness), then correlated Gaussian noise.

Conventions: world mm in (x, y, z) (LUNA16/ITK order: x to the patient's left, y posterior,
z superior); arrays are (z, y, x). ``u = x - cx`` and ``v = y - cy`` are in-plane offsets from the
thorax centre, ``zeta`` is the height in the lungs (0 = lowest lung point, 1 = apex).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .io import ANNOTATION_COLUMNS, Geometry, InputError, read_annotations, voxel_to_world, write_csv_atomic, write_image
from .runconfig import ConfigError

log = logging.getLogger(__name__)

UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."

#: scan height (mm) for ``full_size`` false / true
HEIGHT_MM = {False: 100.0, True: 300.0}
#: slice thicknesses (= slice spacing) and how often they occur (roughly the LIDC mix)
THICKNESSES_MM = (1.0, 1.25, 2.0, 2.5)
THICKNESS_P = (0.15, 0.30, 0.15, 0.40)
TEXTURES = ("solid", "part_solid", "ground_glass")
LOCATIONS = ("parenchymal", "juxta_pleural", "juxta_vascular")
#: most scan indices searched when mapping a seriesuid back to its index
MAX_INDEX = 100_000
#: largest juxta-pleural nodule (mm): the pleural notch it leaves in a thresholded lung mask must stay
#: narrow enough for a ~12 mm closing to fill; larger nodules drawn as juxta-pleural become parenchymal
JUXTA_PLEURAL_MAX_MM = 16.0
#: radius range (mm) of the vessels juxta-vascular nodules are attached to; a nodule at any other
#: location keeps ``VESSEL_CLEARANCE_MM`` of parenchyma from every vessel thicker than this range
#: (a nodule fused with a hilar artery is not "parenchymal" in any reader's terms)
JUXTA_VASCULAR_RADII_MM = (0.8, 2.8)
VESSEL_CLEARANCE_MM = 1.0
#: nodules keep this much (mm, beyond their extent) from the first and last slice: a scan that is a
#: slab of the chest cuts the lungs there, an edge no real CT has through aerated lung (LUNA16 scans
#: cover both lungs), and a nodule beside it is seen cut off in coronal and sagittal views
SCAN_END_CLEARANCE_MM = 12.0

DEFAULTS: dict = {
    "seed": 20210521,
    "output": "resources/synthetic",
    "full_size": False,
    "min_nodules": 0,
    "max_nodules": 4,
    "matrix_size": 512,
    "diameter_quantiles_mm": [3.0, 5.6, 9.2, 28.0, 32.0],
    "noise_hu": [10.0, 40.0],
    "texture_mix": {"solid": 0.72, "part_solid": 0.13, "ground_glass": 0.15},
    "location_mix": {"parenchymal": 0.5, "juxta_pleural": 0.3, "juxta_vascular": 0.2},
}


# =========================================================================== uids and config


def cohort_uids(n_scans: int, seed: int) -> list[str]:
    """LUNA16-like seriesuids of the first ``n_scans`` scans of the cohort with ``seed``.

    Scan i's uid depends only on (seed, i), so growing ``n_scans`` keeps the earlier scans.
    """
    uids = []
    for index in range(n_scans):
        digest = int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest(), 16)
        uids.append(f"{UID_ROOT}{10**29 + digest % (9 * 10**29)}")  # 30 digits, no leading zero
    return uids


def scan_index(uid: str, seed: int, max_index: int = MAX_INDEX) -> int:
    """The index i with ``cohort_uids(i + 1, seed)[-1] == uid``; ConfigError if none below ``max_index``."""
    for index in range(max_index):
        digest = int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest(), 16)
        if f"{UID_ROOT}{10**29 + digest % (9 * 10**29)}" == uid:
            return index
    raise ConfigError(f"seriesuid {uid} is not one of the first {max_index} scans of the synthetic "
                      f"cohort with synthetic.seed = {seed}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_num(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_config(cfg: Mapping) -> dict:
    """The ``synthetic`` block with defaults filled in; ConfigError naming the key on a bad value.

    ``n_scans`` and ``output`` may be present; they do not change any scan.
    """
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in DEFAULTS.items()}
    for key, value in dict(cfg).items():
        if key == "n_scans":
            if not _is_int(value) or value < 1:
                raise ConfigError(f"synthetic.n_scans = {value!r}: must be an integer >= 1")
            continue
        if key not in DEFAULTS:
            raise ConfigError(f"synthetic.{key}: unknown key (known: n_scans, {', '.join(DEFAULTS)})")
        out[key] = value
    if not _is_int(out["seed"]) or out["seed"] < 0:
        raise ConfigError(f"synthetic.seed = {out['seed']!r}: must be an integer >= 0")
    if not isinstance(out["full_size"], bool):
        raise ConfigError(f"synthetic.full_size = {out['full_size']!r}: must be true or false")
    for key in ("min_nodules", "max_nodules"):
        if not _is_int(out[key]) or not 0 <= out[key] <= 20:
            raise ConfigError(f"synthetic.{key} = {out[key]!r}: must be an integer in 0..20")
    if out["min_nodules"] > out["max_nodules"]:
        raise ConfigError(f"synthetic.min_nodules ({out['min_nodules']}) is larger than "
                          f"synthetic.max_nodules ({out['max_nodules']})")
    if not _is_int(out["matrix_size"]) or not 64 <= out["matrix_size"] <= 1024:
        raise ConfigError(f"synthetic.matrix_size = {out['matrix_size']!r}: must be an integer in 64..1024")
    q = out["diameter_quantiles_mm"]
    if (not isinstance(q, (list, tuple)) or len(q) != 5 or not all(_is_num(v) for v in q)
            or not all(a < b for a, b in zip(q, q[1:])) or q[0] < 1.0):
        raise ConfigError(f"synthetic.diameter_quantiles_mm = {q!r}: must be 5 increasing numbers "
                          f"[min, 5th percentile, median, 95th percentile, max] in mm, min >= 1")
    limit = 0.45 * HEIGHT_MM[False]
    if q[-1] > limit:
        raise ConfigError(f"synthetic.diameter_quantiles_mm: largest diameter {q[-1]} mm cannot fit the "
                          f"scan (at most {limit:g} mm: the default scan is {HEIGHT_MM[False]:g} mm tall)")
    out["diameter_quantiles_mm"] = [float(v) for v in q]
    noise = out["noise_hu"]
    if (not isinstance(noise, (list, tuple)) or len(noise) != 2 or not all(_is_num(v) for v in noise)
            or not 0 <= noise[0] <= noise[1] <= 500):
        raise ConfigError(f"synthetic.noise_hu = {noise!r}: must be [low, high] with 0 <= low <= high <= 500")
    out["noise_hu"] = [float(v) for v in noise]
    for key, names in (("texture_mix", TEXTURES), ("location_mix", LOCATIONS)):
        mix = out[key]
        if not isinstance(mix, Mapping):
            raise ConfigError(f"synthetic.{key} = {mix!r}: must be a mapping of {', '.join(names)} to weights")
        unknown = set(mix) - set(names)
        if unknown:
            raise ConfigError(f"synthetic.{key}: unknown entries {sorted(unknown)} (known: {', '.join(names)})")
        full = {name: mix.get(name, 0.0) for name in names}
        if not all(_is_num(w) and w >= 0 for w in full.values()) or sum(full.values()) <= 0:
            raise ConfigError(f"synthetic.{key} = {dict(mix)!r}: weights must be >= 0 with a positive sum")
        out[key] = {name: float(w) for name, w in full.items()}
    return out


# =========================================================================== nodule diameters


def sample_nodule_diameters(rng: np.random.Generator, n: int,
                            quantiles_mm: Sequence[float] = (3.0, 5.6, 9.2, 28.0, 32.0)) -> np.ndarray:
    """``n`` nodule diameters (mm) with exactly the given [min, p05, median, p95, max].

    Between the 5th and 95th percentile the distribution is a two-piece log-normal (one sigma
    below the median, one above, as the LIDC sizes of nodules marked by >= 3 readers are skewed);
    the two tails are log-uniform down to ``min`` and up to ``max``. Inverse-CDF sampling.
    """
    from scipy.special import ndtri

    dmin, p05, med, p95, dmax = (math.log(float(v)) for v in quantiles_mm)
    z95 = 1.6448536269514722
    u = rng.random(n)
    logs = np.empty(n)
    low, high = u < 0.05, u >= 0.95
    mid_lo, mid_hi = (~low) & (u < 0.5), (~high) & (u >= 0.5)
    logs[low] = dmin + (p05 - dmin) * (u[low] / 0.05)
    logs[high] = p95 + (dmax - p95) * ((u[high] - 0.95) / 0.05)
    logs[mid_lo] = med + (med - p05) / z95 * ndtri(u[mid_lo])
    logs[mid_hi] = med + (p95 - med) / z95 * ndtri(u[mid_hi])
    return np.exp(logs)


# =========================================================================== plan data


@dataclass(frozen=True)
class Prim:
    """A tapered capsule (``kind`` "capsule": ends ``a``, ``b``, radii ``r0``, ``r1``) or an
    ellipsoid (``kind`` "ellipsoid": centre ``a``, semi-axes ``b``), world mm.

    ``hu`` is its attenuation (None: drawn elsewhere, e.g. the airways, or only shaping the lungs);
    ``margin`` (mm) is the fat the lungs keep away from it when it belongs to the mediastinum.
    """

    name: str
    kind: str
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r0: float = 0.0
    r1: float = 0.0
    hu: float | None = None
    margin: float = 0.0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.asarray(self.a), np.asarray(self.b)
        if self.kind == "ellipsoid":
            return a - b, a + b
        r = max(self.r0, self.r1)
        return np.minimum(a, b) - r, np.maximum(a, b) + r

    def sdf(self, x, y, z):
        """Approximate signed distance (mm, negative inside) at broadcastable world arrays x, y, z."""
        if self.kind == "ellipsoid":
            return _ellipsoid_sdf(x, y, z, self.a, self.b)
        return _capsule_sdf(x, y, z, self.a, self.b, self.r0, self.r1)


@dataclass
class Segments:
    """Tubes as arrays: ``start``/``end`` (n, 3) world mm (x, y, z), radii ``r0``/``r1`` (mm) at
    the two ends, ``hu`` (n,) the attenuation of the tube's content."""

    start: np.ndarray
    end: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    hu: np.ndarray

    @classmethod
    def empty(cls) -> "Segments":
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0))

    @classmethod
    def concat(cls, parts: Sequence["Segments"]) -> "Segments":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("start", "end", "r0", "r1", "hu")))

    def __len__(self) -> int:
        return len(self.r0)

    @property
    def diameter_mm(self) -> np.ndarray:
        """Mean diameter of each tube (mm)."""
        return self.r0 + self.r1


@dataclass(frozen=True)
class NodulePlan:
    """One nodule: centre of its main body (world mm x, y, z), nominal diameter (mm), texture,
    location, attenuation, and the shape: ``lobes`` rows (axis x, y, z, Legendre order, amplitude)
    modulating the radius, ``core_fraction`` (part-solid: radius of the solid core / radius)."""

    center: tuple[float, float, float]
    diameter_mm: float
    texture: str
    location: str
    hu: float
    core_hu: float
    core_fraction: float
    lobes: tuple[tuple[float, float, float, float, float], ...]
    texture_waves: tuple[tuple[float, float, float, float], ...]  # (kx, ky, kz [rad/mm], phase)
    texture_hu: float
    spicules: tuple[tuple[float, float, float, float, float], ...] = ()  # (unit x, y, z, length, radius) mm

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0

    @property
    def extent_mm(self) -> float:
        """Largest distance from the centre to the surface (mm)."""
        return self.radius_mm * (1.0 + sum(abs(lobe[4]) for lobe in self.lobes))


@dataclass
class Anatomy:
    """Continuous description of one patient's chest (see the module docstring for the frames)."""

    cx: float
    cy: float
    z_base: float
    height: float          # lung height H (mm)
    A0: float              # cavity half-width (mm) at the base
    B0: float              # cavity half-depth (mm)
    egg: float             # posterior widening of the cavity
    g: float               # in-plane size factor of this patient
    wall: dict             # wall thicknesses (mm): rib zone, muscle lat/back/pectoral, fat, fat phase
    band: float            # half-width (mm) of the mediastinum between the lungs anteriorly
    prims: list[Prim]      # mediastinal structures (shape the lungs, most are drawn)
    apex: dict             # per side "r"/"l": (u, v, curvature) of the apex dome
    dome: dict             # per side: (u, v, Ru, Rv, height) of the diaphragm dome
    spine: dict            # vertebral body, canal, period, ...
    ribs: dict             # pitch, slope, phase, sizes
    hu: dict               # tissue attenuations
    zeta_carina: float
    main_airways: list[tuple[Prim, float]]  # (outer capsule, lumen radius at both ends ratio)

    def zeta(self, z):
        return (z - self.z_base) / self.height

    def cavity_axes(self, zeta):
        """Cavity half-width and half-depth (mm) at height ``zeta`` (scalars or arrays)."""
        top = np.clip((zeta - 0.3) / 0.75, 0.0, 1.0) ** 1.5
        return self.A0 * (1.0 - 0.30 * top), self.B0 * (1.0 - 0.10 * top)

    # ---- signed distances (mm, > 0 outside the lung), all broadcastable in (u, v, z)
    def d_cavity(self, u, v, z):
        A, B = self.cavity_axes(self.zeta(z))
        Av = A * (1.0 + self.egg * np.clip(v / B, -1.5, 1.5))
        rho = np.sqrt((u / Av) ** 2 + (v / B) ** 2)
        r = np.sqrt(u * u + v * v)
        return (rho - 1.0) * r / np.maximum(rho, 1e-3)

    def d_mediastinum(self, u, v, z):
        """Distance to the mediastinum (fat margins included), > 0 outside it."""
        x, y = u + self.cx, v + self.cy
        d = np.abs(u) - self.band + 0.0 * v + 0.0 * z
        for prim in self.prims:
            if prim.margin > 0:
                d = np.minimum(d, prim.sdf(x, y, z) - prim.margin)
        return d

    def _height_field(self, kind: str, u, v, z):
        """(distance, +1/-1): apex dome (lung below it) or diaphragm dome (lung above it)."""
        out = []
        for side, sel in (("r", u < 0), ("l", u >= 0)):
            if kind == "apex":
                ua, va, c = self.apex[side]
                du, dv = u - ua, v - va
                zs = self.z_base + self.height - c * (du * du + dv * dv)
                gu, gv = -2 * c * du, -2 * c * dv
                d = (z - zs) / np.sqrt(1.0 + gu * gu + gv * gv)
            else:
                ud, vd, ru, rv, h = self.dome[side]
                du, dv = (u - ud) / ru, (v - vd) / rv
                q = du * du + dv * dv
                inside = q < 1.0
                zs = self.z_base + h * np.maximum(1.0 - q, 0.0)
                gu = np.where(inside, -2 * h * du / ru, 0.0)
                gv = np.where(inside, -2 * h * dv / rv, 0.0)
                d = (zs - z) / np.sqrt(1.0 + gu * gu + gv * gv)
            out.append((sel, d))
        return np.where(out[0][0], out[0][1], out[1][1])

    def lung_sdf(self, x, y, z, parts: bool = False):
        """Signed distance (mm) to the lungs at world points; with ``parts`` also the cavity term
        (the costal pleura: a nodule that touches it touches the chest wall)."""
        x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
        u, v = x - self.cx, y - self.cy
        d_cav = self.d_cavity(u, v, z)
        d = np.maximum(d_cav, -self.d_mediastinum(u, v, z))
        d = np.maximum(d, self._height_field("apex", u, v, z))
        d = np.maximum(d, self._height_field("dome", u, v, z))
        return (d, d_cav) if parts else d


@dataclass
class ScanPlan:
    """Everything random about one scan, drawn by :func:`plan_scan`."""

    uid: str
    index: int
    geometry: Geometry
    shape: tuple[int, int, int]        # (z, y, x)
    noise_sigma: float
    fov_padding: int | None            # HU outside the reconstruction circle (None: no circle)
    anatomy: Anatomy
    vessels: Segments                  # pulmonary arteries and veins inside the lungs
    airways: Segments                  # intrapulmonary bronchi: r0/r1 outer radii, hu = wall HU
    airway_lumen_ratio: float
    nodules: list[NodulePlan]
    seeds: dict = field(default_factory=dict)

    @property
    def slice_thickness(self) -> float:
        return float(self.geometry.spacing[2])

    def z_range(self) -> tuple[float, float]:
        z0 = self.geometry.origin[2]
        return z0, z0 + (self.shape[0] - 1) * self.slice_thickness


# =========================================================================== geometry helpers


def _capsule_sdf(x, y, z, a, b, r0, r1):
    ax, ay, az = x - a[0], y - a[1], z - a[2]
    dx, dy, dz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    l2 = dx * dx + dy * dy + dz * dz
    aa = ax * ax + ay * ay + az * az
    if l2 <= 1e-12:
        return np.sqrt(aa) - r0
    proj = ax * dx + ay * dy + az * dz
    t = np.clip(proj * (1.0 / l2), 0.0, 1.0)
    dist2 = aa - t * (2.0 * proj - t * l2)
    return np.sqrt(np.maximum(dist2, 0.0)) - (r0 + (r1 - r0) * t)


def _ellipsoid_sdf(x, y, z, c, s):
    px, py, pz = x - c[0], y - c[1], z - c[2]
    rho = np.sqrt((px / s[0]) ** 2 + (py / s[1]) ** 2 + (pz / s[2]) ** 2)
    r = np.sqrt(px * px + py * py + pz * pz)
    return (rho - 1.0) * r / np.maximum(rho, 1e-3)


def _occ(d, width):
    """Soft occupancy of a signed distance (mm): 1 inside, 0 outside, a linear ramp ``width`` wide."""
    out = d * (-1.0 / width)
    out += 0.5
    np.maximum(out, 0.0, out=out)
    return np.minimum(out, 1.0, out=out)


def _round64(value: float) -> float:
    """Round to a multiple of 1/64 mm (exact in binary: clean .mhd headers)."""
    return round(value * 64.0) / 64.0


def _unit(v):
    v = np.asarray(v, float)
    return v / max(np.linalg.norm(v), 1e-12)


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_SPHERE = _fibonacci_sphere(96)


def _legendre(order: int, c):
    if order == 2:
        return 1.5 * c * c - 0.5
    if order == 3:
        return (2.5 * c * c - 1.5) * c
    c2 = c * c
    return (35.0 * c2 * c2 - 30.0 * c2 + 3.0) / 8.0


def nodule_radius(nodule: NodulePlan, unit_dirs: np.ndarray) -> np.ndarray:
    """Radius (mm) of a nodule's surface along unit directions (..., 3) (x, y, z)."""
    scale = np.ones(unit_dirs.shape[:-1])
    for ax, ay, az, order, amp in nodule.lobes:
        cos = unit_dirs[..., 0] * ax + unit_dirs[..., 1] * ay + unit_dirs[..., 2] * az
        scale = scale + amp * _legendre(int(order), cos)
    return nodule.radius_mm * scale


# =========================================================================== planning


def _spawn(seed: int, index: int, n: int) -> list[np.random.Generator]:
    seq = np.random.SeedSequence([int(seed), int(index)])
    return [np.random.default_rng(s) for s in seq.spawn(n)]


def plan_scan(index: int, cfg: Mapping, uid: str | None = None) -> ScanPlan:
    """Draw scan ``index`` of the cohort described by ``cfg`` (the ``synthetic`` block)."""
    cfg = validate_config(cfg)
    seed = cfg["seed"]
    uid = uid or cohort_uids(index + 1, seed)[-1]
    rng_geo, rng_anat, rng_vessel, rng_nod, rng_noise, rng_misc = _spawn(seed, index, 6)
    n = cfg["matrix_size"]
    height = HEIGHT_MM[cfg["full_size"]]

    # ---- body size first, then a field of view that fits it (spacing = FOV / 512)
    person = float(rng_anat.uniform(0.86, 1.10))
    A0s, B0s = rng_anat.uniform(118, 134), rng_anat.uniform(80, 94)
    wall = {"rib": 10.5, "m_lat": rng_anat.uniform(6, 13), "m_back": rng_anat.uniform(26, 40),
            "m_pec": rng_anat.uniform(8, 20), "fat": rng_anat.uniform(5, 26),
            "fat_post": rng_anat.uniform(0, 15), "fat_phase": rng_anat.uniform(-0.6, 0.6)}
    width0 = 2 * (A0s + wall["rib"] + wall["m_lat"] + wall["fat"] * 1.1)
    fill = float(rng_geo.uniform(0.80, 0.92))
    fov = int(round(np.clip(width0 * person / fill, 282, 435)))
    spacing_xy = fov / n
    g = fill * fov / width0
    thickness = float(rng_geo.choice(THICKNESSES_MM, p=THICKNESS_P))
    nz = int(round(height / thickness))
    ox = _round64(-fov / 2 + rng_geo.uniform(-25, 25))
    oy = _round64(-fov / 2 + rng_geo.uniform(-30, 15))
    oz = _round64(rng_geo.uniform(-380, -60))
    geometry = Geometry((spacing_xy, spacing_xy, thickness), (ox, oy, oz))

    for key in ("rib", "m_lat", "m_back", "m_pec", "fat", "fat_post"):
        wall[key] *= g
    A0, B0 = A0s * g, B0s * g
    w_ant = wall["rib"] + wall["m_lat"] + wall["m_pec"] * 0.4 + wall["fat"]
    w_post = wall["rib"] + wall["m_back"] + wall["fat"]
    cx = ox + (n - 1) * spacing_xy / 2 + rng_geo.uniform(-8, 8)
    cy = oy + (n - 1) * spacing_xy / 2 + rng_geo.uniform(-4, 12) * g - (w_post - w_ant) / 2
    cy = min(cy, oy + (n - 1) * spacing_xy - (B0 + w_post) - 4.0)

    H = float(rng_anat.uniform(215, 262))
    zeta_c = float(rng_anat.uniform(0.50, 0.60) if not cfg["full_size"] else rng_anat.uniform(0.44, 0.50))
    z_mid = oz + (nz - 1) * thickness / 2
    z_base = z_mid - zeta_c * H
    anatomy = _plan_anatomy(rng_anat, cx, cy, z_base, H, A0, B0, g, wall)

    noise_lo, noise_hi = cfg["noise_hu"]
    noise_sigma = float(rng_noise.uniform(noise_lo, noise_hi))
    padding = int(rng_misc.choice([-3024, -2000])) if rng_misc.random() < 0.35 else None

    plan = ScanPlan(uid=uid, index=index, geometry=geometry, shape=(nz, n, n), noise_sigma=noise_sigma,
                    fov_padding=padding, anatomy=anatomy, vessels=Segments.empty(),
                    airways=Segments.empty(), airway_lumen_ratio=0.72, nodules=[],
                    seeds={"noise": int(rng_noise.integers(2**31)), "texture": int(rng_misc.integers(2**31))})
    plan.vessels, plan.airways = _plan_trees(rng_vessel, anatomy)
    plan.nodules = _plan_nodules(rng_nod, plan, cfg)
    return plan


def _plan_anatomy(rng, cx, cy, z_base, H, A0, B0, g, wall) -> Anatomy:
    u01 = rng.uniform
    hu = {"fat": u01(-110, -85), "muscle": u01(35, 55), "blood": u01(30, 45), "organ": u01(45, 62),
          "cortex": u01(650, 950), "marrow": u01(150, 300), "disc": u01(70, 100), "cartilage": u01(90, 160),
          "lung": u01(-885, -830), "lung_gradient": u01(10, 35), "lung_texture": u01(8, 18),
          "airway_wall": u01(-60, 20), "table": u01(60, 220), "mediastinal_fat": u01(-100, -75)}
    zeta_car = float(u01(0.60, 0.66))
    zeta_arch = zeta_car + float(u01(0.06, 0.10))
    zeta_pa = zeta_car - float(u01(0.02, 0.045))
    zeta_la = zeta_car - float(u01(0.14, 0.18))

    def w(u, v, zeta):  # thorax (u, v, zeta) -> world (x, y, z)
        return (cx + u * g, cy + v * g, z_base + zeta * H)

    r_vb = 16.0 * float(u01(0.92, 1.08))
    v_vb = 0.80 * B0 / g
    v_es = v_vb - r_vb - 6.0
    r_tr = float(u01(8.5, 11.0))
    v_tr = v_es - 7.0 - r_tr - 3.0
    r_ao = float(u01(11.0, 14.0))
    u_da = r_vb + 0.55 * r_ao
    v_da = v_vb - 6.0
    v_asc = v_tr - 38.0
    top, bottom = 1.4, -0.5
    blood, muscle = hu["blood"], hu["muscle"]
    dz_car = lambda mm: zeta_car + mm / H  # noqa: E731

    prims: list[Prim] = []

    def cap(name, p0, p1, r0, r1=None, hu_=None, margin=3.0):
        prims.append(Prim(name, "capsule", w(*p0), w(*p1), r0 * g, (r0 if r1 is None else r1) * g,
                          hu_, margin * g))

    cap("vertebral_body", (0, v_vb, bottom), (0, v_vb, top), r_vb, hu_=None, margin=5.0)
    cap("esophagus", (8, v_es, bottom), (4, v_es, top), 7.0, hu_=muscle, margin=3.0)
    cap("descending_aorta", (u_da, v_da, bottom), (u_da, v_da, zeta_arch), r_ao, hu_=blood, margin=5.0)
    cap("ascending_aorta", (-12, v_asc, 0.40), (-12, v_asc, zeta_arch), r_ao + 2, r_ao, hu_=blood, margin=6.0)
    arch_mid = (r_tr + r_ao + 3.0, v_tr + 2.0, zeta_arch + 0.3 * r_ao / H)
    cap("aortic_arch_1", (-12, v_asc, zeta_arch), arch_mid, r_ao, hu_=blood, margin=5.0)
    cap("aortic_arch_2", arch_mid, (u_da, v_da, zeta_arch), r_ao, hu_=blood, margin=5.0)
    cap("svc", (-30, v_tr - 22, 0.42), (-30, v_tr - 22, top), 9.0, hu_=blood, margin=5.0)
    cap("brachiocephalic", (-8, v_tr - 28, zeta_arch), (-14, v_tr - 24, top), 6.0, hu_=blood, margin=3.0)
    cap("left_carotid", (6, v_tr - 24, zeta_arch), (10, v_tr - 22, top), 4.5, hu_=blood, margin=3.0)
    cap("left_subclavian", (18, v_tr - 8, zeta_arch), (26, v_tr - 10, top), 5.0, hu_=blood, margin=3.0)
    pa_top = (8, v_tr - 22, zeta_pa)
    cap("pulmonary_trunk", (12, v_asc - 10, 0.44), pa_top, 14.0, 12.0, hu_=blood, margin=3.0)
    rpa_end = (-44, v_tr - 10, zeta_car - 0.05)
    lpa_end = (46, v_tr + 6, zeta_car - 0.005)
    cap("right_pa", pa_top, rpa_end, 10.0, 8.5, hu_=blood, margin=2.5)
    cap("left_pa", pa_top, lpa_end, 10.0, 8.5, hu_=blood, margin=2.5)
    la = (6, v_es - 26, zeta_la)
    rpv_end = (-44, v_es - 30, zeta_la + 0.015)
    lpv_end = (44, v_es - 22, zeta_la + 0.025)
    cap("right_pv", la, rpv_end, 8.0, 6.5, hu_=blood, margin=2.5)
    cap("left_pv", la, lpv_end, 8.0, 6.5, hu_=blood, margin=2.5)
    heart_c = w(0.15 * A0 / g, -0.30 * B0 / g, 0.27)
    prims.append(Prim("heart", "ellipsoid", heart_c, (0.50 * A0, 0.56 * B0, 0.21 * H), hu=blood, margin=7.0 * g))
    # the mediastinal fat envelope between the lungs (shapes the lungs, drawn as the cavity's fat)
    env_c = w(2.0, 0.5 * (v_asc + v_vb) - 8.0, 0.80)
    env_half = float(u01(20, 30))
    prims.append(Prim("mediastinum", "ellipsoid", env_c, (env_half * g, (0.5 * (v_vb - v_asc) + 22.0) * g, 0.42 * H),
                      hu=None, margin=1.0 * g))
    for k in range(int(rng.integers(3, 7))):
        side = -1 if k % 2 == 0 else 1
        c = w(side * u01(12, 30), v_tr + u01(-18, 12), dz_car(u01(-15, 25)))
        r = float(u01(3, 6)) * g
        c = _embed_in_mediastinum(c, side, [p for p in prims if not p.name.startswith("lymph_node")])
        prims.append(Prim(f"lymph_node_{k}", "ellipsoid", c, (r, r * u01(0.7, 1.0), r * u01(0.8, 1.3)),
                          hu=muscle - 5.0, margin=1.5 * g))
    # trachea and main bronchi: outer capsules (drawn as airways), shape the mediastinum too
    carina = (0, v_tr, zeta_car)
    rmb_end = (-38, v_tr + 12, dz_car(-22))
    lmb_end = (43, v_tr + 16, dz_car(-34))
    main_airways = []
    for name, p0, p1, r0, r1 in (("trachea", (0, v_tr, top), carina, r_tr, r_tr * 0.95),
                                 ("right_main_bronchus", carina, rmb_end, 7.8, 7.0),
                                 ("left_main_bronchus", carina, lmb_end, 6.8, 6.0)):
        cap(name, p0, p1, r0, r1, hu_=None, margin=2.0)
        main_airways.append((prims[-1], 0.8))

    curvature = 0.3 * H / (0.55 * A0) ** 2
    apex = {"r": (-0.50 * A0, 0.15 * B0, curvature), "l": (0.50 * A0, 0.15 * B0, curvature)}
    dome = {"r": (-0.40 * A0, -0.15 * B0, 0.62 * A0, 1.2 * B0, float(u01(0.24, 0.30)) * H),
            "l": (0.40 * A0, -0.15 * B0, 0.62 * A0, 1.2 * B0, float(u01(0.19, 0.25)) * H)}
    spine = {"v_vb": v_vb * g, "r_vb": r_vb * g, "period": float(u01(24, 28)) * H / 240.0,
             "disc": 5.0, "phase": float(u01(0, 30)), "v_canal": (v_vb + r_vb + 7.0) * g, "r_canal": 7.0 * g}
    ribs = {"pitch": float(u01(21, 26)) * H / 240.0, "slope": float(u01(0.30, 0.45)),
            "phase": float(u01(0, 30)), "depth": 6.0 * g, "half_radial": 3.3 * g, "half_height": 5.5,
            "r_mean": 0.5 * (A0 + B0)}
    return Anatomy(cx=cx, cy=cy, z_base=z_base, height=H, A0=A0, B0=B0, egg=float(u01(0.03, 0.10)), g=g,
                   wall=wall, band=float(u01(3.5, 7.0)) * g, prims=prims, apex=apex, dome=dome, spine=spine,
                   ribs=ribs, hu=hu, zeta_carina=zeta_car, main_airways=main_airways)


def _embed_in_mediastinum(centre, side: int, mediastinum: Sequence[Prim]) -> tuple[float, float, float]:
    """A lymph node centre (world mm, x, y, z) moved toward the midline (``side`` -1: right, +1: left)
    until it is no longer outside the mediastinum that ``mediastinum`` (structures with a fat margin)
    outlines. A mediastinal or hilar node lies in the mediastinal fat or bulges from it into the
    lung; one floating free in aerated lung would be a solid nodule in all but name (an
    intrapulmonary node, which readers annotate as a nodule), and an unannotated one is label noise."""
    x, y, z = (float(v) for v in centre)
    for _ in range(6):
        d = min(float(p.sdf(x, y, z)) - p.margin for p in mediastinum if p.margin > 0)
        if d <= 0.0:
            break
        x -= side * (d + 0.25)
    return (x, y, z)


# ---------------------------------------------------------------- vessel and airway trees


def _sample_in_lung(rng, anatomy: Anatomy, side: int, n: int, margin: float) -> np.ndarray:
    """``n`` points (x, y, z) uniform inside one lung (side -1 right, +1 left), ``margin`` mm deep."""
    pts = []
    got = 0
    lo = np.array([anatomy.cx + (0 if side > 0 else -anatomy.A0 * 1.1), anatomy.cy - anatomy.B0 * 1.1,
                   anatomy.z_base])
    hi = np.array([anatomy.cx + (anatomy.A0 * 1.1 if side > 0 else 0), anatomy.cy + anatomy.B0 * 1.1,
                   anatomy.z_base + anatomy.height])
    while got < n:
        cand = lo + (hi - lo) * rng.random((4 * n, 3))
        d = anatomy.lung_sdf(cand[:, 0], cand[:, 1], cand[:, 2])
        keep = cand[d < -margin]
        pts.append(keep)
        got += len(keep)
    return np.concatenate(pts)[:n]


def _grow_tree(rng, root: np.ndarray, points: np.ndarray, r_leaf: float):
    """Space-filling tree from ``root`` by recursive bisection of the territory ``points``.

    Returns node positions (m, 3), node radii (m,) and parents (m,) (-1 for the root). A branch
    heads part of the way to its territory's centroid, then splits it unevenly across its longest
    extent; radii follow Murray's law (r^3 = r1^3 + r2^3, so r ~ points^(1/3)).
    """
    pos = [np.asarray(root, float)]
    rad = [r_leaf * len(points) ** (1 / 3)]
    par = [-1]
    stack = [(0, points)]
    while stack:
        node, pts = stack.pop()
        n = len(pts)
        r = r_leaf * n ** (1 / 3)
        if n == 1:
            pos.append(pts[0])
            rad.append(r)
            par.append(node)
            continue
        start = pos[node]
        centroid = pts.sum(axis=0) / n
        step = centroid - start
        dist = math.sqrt(float(step @ step))
        u = rng.random(4)
        frac = 0.35 + 0.25 * u[0] if n > 3 else 0.6 + 0.3 * u[0]
        end = start + step * frac
        if dist * frac > 8.0:  # a gentle bend part of the way
            mid = start + step * (frac * (0.35 + 0.3 * u[1])) + rng.normal(0, 0.12 * dist * frac, 3)
            pos.append(mid)
            rad.append(r)
            par.append(node)
            node = len(pos) - 1
        pos.append(end)
        rad.append(r)
        par.append(node)
        here = len(pos) - 1
        if n == 2:
            stack.append((here, pts[:1]))
            stack.append((here, pts[1:]))
            continue
        centred = pts - centroid
        far = centred[int(np.argmax((centred * centred).sum(axis=1)))]
        axis = far / max(math.sqrt(float(far @ far)), 1e-9) + rng.normal(0, 0.35, 3)
        proj = centred @ axis
        order = np.argsort(proj, kind="stable")
        cut = min(max(int(round(n * (0.22 + 0.28 * u[2]))), 1), n - 1)
        stack.append((here, pts[order[:cut]]))
        stack.append((here, pts[order[cut:]]))
    return np.array(pos), np.array(rad), np.array(par)


def _tree_segments(pos, rad, par, hu, taper=0.9) -> Segments:
    child = np.flatnonzero(par >= 0)
    parent = par[child]
    r0 = rad[child]
    is_leaf = np.ones(len(pos), bool)
    is_leaf[par[par >= 0]] = False
    r1 = np.where(is_leaf[child], r0 * 0.5, r0 * taper)
    return Segments(pos[parent], pos[child], r0, r1, np.full(len(child), float(hu)))


def _plan_trees(rng, anatomy: Anatomy) -> tuple[Segments, Segments]:
    """Arteries and veins (two trees per lung) and the bronchi beside the arteries."""
    by_name = {p.name: p for p in anatomy.prims}
    vessels, airways = [], []
    blood = anatomy.hu["blood"]
    for side, key in ((-1, "right"), (1, "left")):
        for kind, n_points in (("pa", 640), ("pv", 560)):
            prim = by_name[f"{key}_{kind}"]
            root = np.asarray(prim.b, float) + np.array([side * 7.0 * anatomy.g, 0.0, 0.0])
            points = _sample_in_lung(rng, anatomy, side, n_points, margin=4.0)
            r_leaf = rng.uniform(0.60, 0.70)
            pos, rad, par = _grow_tree(rng, root, points, r_leaf)
            vessels.append(_tree_segments(pos, rad, par, blood + rng.uniform(-4, 4)))
            if kind == "pa":
                airways.append(_airway_from_artery(rng, anatomy, key, pos, rad, par))
    return Segments.concat(vessels), Segments.concat(airways)


def _airway_from_artery(rng, anatomy: Anatomy, key: str, pos, rad, par) -> Segments:
    """Bronchi running beside the larger arteries (outer radius ~ the artery's), from the main bronchus."""
    bronchus = next(p for p, _ in anatomy.main_airways if p.name == f"{key}_main_bronchus")
    keep = rad >= 1.6
    keep[0] = True
    ref = _unit(rng.normal(0, 1, 3))
    new_pos = pos.copy()
    for i in range(1, len(pos)):
        if not keep[i]:
            continue
        direction = _unit(pos[i] - pos[par[i]])
        perp = np.cross(direction, ref)
        if np.linalg.norm(perp) < 0.2:
            perp = np.cross(direction, [0.0, 0.0, 1.0])
        new_pos[i] = pos[i] + _unit(perp) * (rad[i] * 1.9 + 1.0)
    new_pos[0] = np.asarray(bronchus.b, float)
    child = np.flatnonzero((par >= 0) & keep)
    child = child[keep[par[child]]]
    r0 = rad[child] * 1.05
    r1 = r0 * 0.92
    return Segments(new_pos[par[child]], new_pos[child], r0, r1, np.full(len(child), anatomy.hu["airway_wall"]))


# ---------------------------------------------------------------- nodules


def _plan_nodules(rng, plan: ScanPlan, cfg: dict) -> list[NodulePlan]:
    anatomy = plan.anatomy
    count = int(rng.integers(cfg["min_nodules"], cfg["max_nodules"] + 1))
    tex_names, tex_w = zip(*cfg["texture_mix"].items())
    loc_names, loc_w = zip(*cfg["location_mix"].items())
    tex_p = np.asarray(tex_w) / sum(tex_w)
    loc_p = np.asarray(loc_w) / sum(loc_w)
    z_lo, z_hi = plan.z_range()
    margin = max(plan.slice_thickness, SCAN_END_CLEARANCE_MM)
    nodules: list[NodulePlan] = []
    for k in range(count):
        diameter = float(sample_nodule_diameters(rng, 1, cfg["diameter_quantiles_mm"])[0])
        texture = str(rng.choice(tex_names, p=tex_p))
        location = str(rng.choice(loc_names, p=loc_p))
        if location == "juxta_pleural" and diameter > JUXTA_PLEURAL_MAX_MM:
            location = "parenchymal"
        shape = _nodule_shape(rng, diameter, texture)
        placed = None
        for loc in (location, "parenchymal"):
            center = _place_nodule(rng, plan, shape, loc, nodules, (z_lo + margin, z_hi - margin))
            if center is not None:
                placed = NodulePlan(center=tuple(float(c) for c in center), location=loc, **shape)
                break
        if placed is None:
            log.warning("scan %s: nodule %d (%.1f mm) did not fit anywhere; left out", plan.uid, k + 1, diameter)
            continue
        nodules.append(placed)
    return nodules


def _nodule_shape(rng, diameter: float, texture: str) -> dict:
    lobes = []
    size_factor = min(1.0, 0.35 + diameter / 20.0)
    for order in (2, 3, 4):
        axis = _unit(rng.normal(0, 1, 3))
        amp = float(rng.uniform(0.0, 0.12 if order == 2 else 0.10)) * size_factor
        lobes.append((float(axis[0]), float(axis[1]), float(axis[2]), float(order), amp))
    if texture == "solid":
        hu = float(np.clip(rng.normal(25, 35), -100, 100))
        core_hu, core_fraction, tex_hu = hu, 0.0, 10.0
    elif texture == "part_solid":
        hu = float(rng.uniform(-650, -430))
        core_hu, core_fraction, tex_hu = float(rng.uniform(-40, 60)), float(rng.uniform(0.35, 0.6)), 25.0
    else:
        hu = float(rng.uniform(-700, -400))  # within the -750..-400 of ground glass, visible through noise
        core_hu, core_fraction, tex_hu = hu, 0.0, 30.0
    waves = []
    for _ in range(3):
        k = _unit(rng.normal(0, 1, 3)) * (2 * math.pi / rng.uniform(2.5, 6.0))
        waves.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * math.pi))))
    spicules = []
    if texture == "solid" and diameter >= 8.0 and rng.random() < 0.3:
        for _ in range(int(rng.integers(5, 11))):
            d = _unit(rng.normal(0, 1, 3))
            spicules.append((float(d[0]), float(d[1]), float(d[2]), float(rng.uniform(0.4, 1.0) * diameter / 2),
                             float(rng.uniform(0.35, 0.6))))
    return {"diameter_mm": diameter, "texture": texture, "hu": hu, "core_hu": core_hu,
            "core_fraction": core_fraction, "lobes": tuple(lobes), "texture_waves": tuple(waves),
            "texture_hu": tex_hu, "spicules": tuple(spicules)}


def _place_nodule(rng, plan: ScanPlan, shape: dict, location: str, others: list[NodulePlan],
                  z_limits: tuple[float, float], batches: int = 12, batch: int = 512):
    """A centre (x, y, z) for a nodule of ``shape`` at ``location``, or None."""
    anatomy = plan.anatomy
    probe = NodulePlan(center=(0.0, 0.0, 0.0), location=location, **shape)
    R = probe.radius_mm
    ext = probe.extent_mm
    surface = _SPHERE * nodule_radius(probe, _SPHERE)[:, None]  # (96, 3) offsets, mm
    z_lo, z_hi = z_limits[0] + ext, z_limits[1] - ext
    if z_lo >= z_hi:
        return None
    vessels = plan.vessels
    for _ in range(batches):
        if location == "juxta_vascular":
            mid_z = 0.5 * (vessels.start[:, 2] + vessels.end[:, 2])
            r_lo, r_hi = JUXTA_VASCULAR_RADII_MM
            ok = (vessels.r0 >= r_lo) & (vessels.r0 <= r_hi) & (mid_z > z_lo) & (mid_z < z_hi)
            idx = np.flatnonzero(ok)
            if len(idx) == 0:
                return None
            pick = rng.choice(idx, batch)
            tt = rng.uniform(0.2, 0.8, batch)[:, None]
            on_axis = vessels.start[pick] + tt * (vessels.end[pick] - vessels.start[pick])
            axis = vessels.end[pick] - vessels.start[pick]
            axis = axis / np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-9)
            perp = np.cross(axis, rng.normal(0, 1, (batch, 3)))
            perp = perp / np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-9)
            cand = on_axis + perp * (R * 0.95 + vessels.r0[pick][:, None] * 0.6)
        else:
            a = anatomy
            lo = np.array([a.cx - a.A0, a.cy - a.B0 * 1.05, z_lo])
            hi = np.array([a.cx + a.A0, a.cy + a.B0 * 1.05, z_hi])
            cand = lo + (hi - lo) * rng.random((batch, 3))
        cand = cand[(cand[:, 2] > z_lo) & (cand[:, 2] < z_hi)]
        if len(cand) == 0:
            continue
        d_c, dcav_c = anatomy.lung_sdf(cand[:, 0], cand[:, 1], cand[:, 2], parts=True)
        if location == "juxta_pleural":
            pre = (d_c < -max(0.4 * R, 1.6)) & (d_c > -0.85 * R) & (dcav_c >= d_c - 1e-6)
        else:
            pre = d_c < -(ext + 1.5)
        cand = cand[pre]
        if len(cand) == 0:
            continue
        pts = cand[:, None, :] + surface[None, :, :]
        d_s = anatomy.lung_sdf(pts[..., 0], pts[..., 1], pts[..., 2])
        if location == "juxta_pleural":
            # touches the chest wall, but most of it inside the lung
            outside = d_s > 1.0
            ok = (outside.sum(axis=1) >= 2) & (outside.mean(axis=1) < 0.4) & (d_s.max(axis=1) < R)
            pts_in = cand[:, None, :] + 0.5 * surface[None, :, :]
            d_half = anatomy.lung_sdf(pts_in[..., 0], pts_in[..., 1], pts_in[..., 2])
            ok &= (d_half < 0).mean(axis=1) > 0.75
        else:
            ok = d_s.max(axis=1) < -1.0
        if location != "juxta_vascular":
            ok &= _clear_of_large_vessels(cand, R, vessels)
        for c in cand[ok]:
            if all(np.linalg.norm(c - np.asarray(o.center)) > ext + o.extent_mm + 3.0 for o in others):
                return c
    return None


def _clear_of_large_vessels(centres: np.ndarray, radius: float, vessels: Segments) -> np.ndarray:
    """Bool (m,): whether a nodule of ``radius`` (mm) at each of ``centres`` (m, 3) (world mm) keeps
    :data:`VESSEL_CLEARANCE_MM` from every vessel thicker than juxta-vascular nodules' hosts."""
    x, y, z = np.asarray(centres, dtype=float).reshape(-1, 3).T
    gap = np.full(len(x), np.inf)
    for i in np.flatnonzero(np.maximum(vessels.r0, vessels.r1) > JUXTA_VASCULAR_RADII_MM[1]):
        surface = _capsule_sdf(x, y, z, vessels.start[i], vessels.end[i], vessels.r0[i], vessels.r1[i])
        np.minimum(gap, surface - radius, out=gap)
    return gap >= VESSEL_CLEARANCE_MM


# =========================================================================== rendering


def nodule_spicules(nodules: Sequence[NodulePlan]) -> Segments:
    """The spicules of spiculated nodules as thin tubes (outside the nodule labels, as readers draw them)."""
    parts = []
    for n in nodules:
        if not n.spicules:
            continue
        dirs = np.array([sp[:3] for sp in n.spicules])
        length = np.array([sp[3] for sp in n.spicules])
        start = np.asarray(n.center) + dirs * (nodule_radius(n, dirs) * 0.85)[:, None]
        end = start + dirs * length[:, None]
        r0 = np.array([sp[4] for sp in n.spicules])
        parts.append(Segments(start, end, r0, np.full(len(r0), 0.15), np.full(len(r0), n.hu)))
    return Segments.concat(parts)


class _Grid:
    """World coordinates of a scan's voxel centres: x (nx,), y (ny,), z (nz,), float64."""

    def __init__(self, plan: ScanPlan):
        nz, ny, nx = plan.shape
        (sx, sy, sz), (ox, oy, oz) = plan.geometry.spacing, plan.geometry.origin
        self.shape = plan.shape
        self.spacing = (sx, sy, sz)
        self.x = ox + sx * np.arange(nx)
        self.y = oy + sy * np.arange(ny)
        self.z = oz + sz * np.arange(nz)

    def box(self, lo, hi, pad: int = 1):
        """Index slices (z, y, x) of the voxels whose centres may fall in world box [lo, hi]."""
        idx = []
        for axis, coords, spacing in ((2, self.z, self.spacing[2]), (1, self.y, self.spacing[1]),
                                      (0, self.x, self.spacing[0])):
            i0 = int(math.floor((lo[axis] - coords[0]) / spacing)) - pad
            i1 = int(math.ceil((hi[axis] - coords[0]) / spacing)) + pad + 1
            i0, i1 = max(i0, 0), min(i1, len(coords))
            if i0 >= i1:
                return None
            idx.append(slice(i0, i1))
        return tuple(idx)

    def fine_z(self, zs: slice, k: int) -> np.ndarray:
        """Sub-slice centres (k per slice) of slices ``zs`` (partial volume over the thickness)."""
        t = self.spacing[2]
        offsets = ((np.arange(k) + 0.5) / k - 0.5) * t
        return (self.z[zs][:, None] + offsets[None, :]).ravel()


def _coords(grid: _Grid, box, k: int, origin):
    zs, ys, xs = box
    z = (grid.fine_z(zs, k) - origin[2]).astype(np.float32)[:, None, None]
    y = (grid.y[ys] - origin[1]).astype(np.float32)[None, :, None]
    x = (grid.x[xs] - origin[0]).astype(np.float32)[None, None, :]
    return x, y, z


def _average_z(array: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return array
    nzk, ny, nx = array.shape
    return array.reshape(nzk // k, k, ny, nx).mean(axis=1)


def _render_tubes(vol, lung_q, grid: _Grid, seg: Segments, k: int, width: float,
                  clip_to_lung: bool, radius_scale: float = 1.0, hu_override=None,
                  exclude_from_lung: bool = False) -> None:
    """Composite tapered tubes into ``vol`` (partial volume over ``k`` sub-slices); optionally only
    inside the lung (``clip_to_lung``) or taking the tubes out of the lung (``exclude_from_lung``)."""
    z_lo, z_hi = grid.z[0] - grid.spacing[2], grid.z[-1] + grid.spacing[2]
    for i in range(len(seg)):
        a, b = seg.start[i], seg.end[i]
        r0, r1 = seg.r0[i] * radius_scale, seg.r1[i] * radius_scale
        rmax = max(r0, r1) + width
        lo, hi = np.minimum(a, b) - rmax, np.maximum(a, b) + rmax
        if hi[2] < z_lo or lo[2] > z_hi:
            continue
        box = grid.box(lo, hi)
        if box is None:
            continue
        x, y, z = _coords(grid, box, k, a)
        d = _capsule_sdf(x, y, z, (0.0, 0.0, 0.0), tuple((b - a).astype(np.float32)), float(r0), float(r1))
        occ = _average_z(_occ(d, width), k)
        if clip_to_lung:
            occ = np.minimum(occ, lung_q[box] * np.float32(1 / 255))
        if exclude_from_lung:
            lq = lung_q[box]
            lq[occ >= 0.5] = 0
        value = float(hu_override if hu_override is not None else seg.hu[i])
        target = vol[box]
        target += (value - target) * occ


def _render_nodule(vol, lung_q, labels, grid: _Grid, nodule: NodulePlan, label: int, width: float) -> None:
    t = grid.spacing[2]
    k = max(1, math.ceil(t / 0.35))
    c = np.asarray(nodule.center)
    ext = nodule.extent_mm + width
    box = grid.box(c - ext, c + ext)
    if box is None:
        return
    x, y, z = _coords(grid, box, k, c)
    r = np.sqrt(x * x + y * y + z * z) + np.float32(1e-4)
    scale = np.float32(1.0)
    for ax, ay, az, order, amp in nodule.lobes:
        cos = (x * np.float32(ax) + y * np.float32(ay) + z * np.float32(az)) / r
        scale = scale + np.float32(amp) * _legendre(int(order), cos)
    surface = np.float32(nodule.radius_mm) * scale
    occ = _occ(r - surface, width)
    value = np.float32(nodule.hu)
    for kx, ky, kz, phase in nodule.texture_waves:
        value = value + np.float32(nodule.texture_hu / 1.2247) * np.cos(
            x * np.float32(kx) + y * np.float32(ky) + z * np.float32(kz) + np.float32(phase))
    if nodule.core_fraction > 0:
        core = _occ(r - surface * np.float32(nodule.core_fraction), width)
        value = value + (np.float32(nodule.core_hu) - value) * core
    alpha = _average_z(occ, k)
    weighted = _average_z(occ * value, k)
    lung = lung_q[box] * np.float32(1 / 255)
    clipped = np.minimum(alpha, lung)
    ratio = clipped / np.maximum(alpha, np.float32(1e-6))
    target = vol[box]
    target *= 1 - clipped
    target += weighted * ratio
    lab = labels[box]
    inside = (clipped >= 0.5) & (lab == 0)
    if not inside.any():  # smaller than a voxel after partial volume: keep its most covered voxel
        inside = np.zeros_like(inside)
        inside.flat[int(np.argmax(np.where(lab == 0, clipped, -1.0)))] = True
    lab[inside] = label


class _SliceRenderer:
    """Anatomy of one axial sub-slice at a time, on 2-D arrays (y, x) of a window around the body."""

    def __init__(self, plan: ScanPlan, grid: _Grid):
        a = plan.anatomy
        self.a = a
        self.grid = grid
        self.width = float(grid.spacing[0])
        f32 = np.float32
        wl = a.wall
        # the window: every voxel the body may reach at any height
        w_max = (wl["rib"] + wl["m_lat"] + wl["m_back"] + wl["m_pec"] + 1.3 * wl["fat"] + wl["fat_post"]) * 1.35
        reach_u = a.A0 * (1 + 1.5 * a.egg) + w_max + 5
        self.v_flat = a.B0 + wl["rib"] + 0.8 * wl["m_back"] + wl["fat"]
        box = grid.box((a.cx - reach_u, a.cy - a.B0 - w_max - 5, grid.z[0]),
                       (a.cx + reach_u, a.cy + self.v_flat + 3, grid.z[0]), pad=2)
        self.ys, self.xs = box[1], box[2]
        self.x = grid.x[self.xs]
        self.y = grid.y[self.ys]
        self.u1 = (self.x - a.cx).astype(f32)[None, :]
        self.v1 = (self.y - a.cy).astype(f32)[:, None]
        u, v = np.broadcast_arrays(self.u1.astype(float), self.v1.astype(float))
        self.u2 = self.u1 * self.u1
        self.r = np.sqrt(self.u2 + self.v1 * self.v1).astype(f32)
        theta = np.arctan2(u, v)          # 0 posterior, +-pi anterior, < 0 patient's right
        abs_t = np.abs(theta)
        muscle = (wl["m_lat"] + wl["m_back"] * np.exp(-(theta / 0.55) ** 2)
                  + wl["m_pec"] * np.exp(-((abs_t - 2.45) / 0.45) ** 2))
        fat = (wl["fat"] * (1 + 0.3 * np.cos(theta - wl["fat_phase"]))
               + wl["fat_post"] * np.exp(-((abs_t - 1.1) / 0.6) ** 2))
        self.w_muscle = (wl["rib"] + muscle).astype(f32)
        self.w_body = (wl["rib"] + muscle + fat).astype(f32)
        # a fat plane between the superficial and the deep muscles (pectoral and back muscles)
        self.w_plane = (wl["rib"] + 0.45 * muscle).astype(f32)
        self.plane_weight = (np.exp(-(theta / 0.5) ** 2) + np.exp(-((abs_t - 2.45) / 0.35) ** 2)).astype(f32)
        self.plane_weight *= (muscle > 12 * a.g)
        self.abs_theta = abs_t.astype(f32)
        rb = a.ribs
        self.rib_s = (abs_t * rb["r_mean"] * rb["slope"]).astype(f32)
        self.rib_arc = ((abs_t > 0.24) & (abs_t < 2.45)).astype(f32)
        self.cartilage_arc = ((abs_t >= 2.45) & (abs_t < 2.85)).astype(f32)
        self.apex_z, self.apex_n = self._height_field(u, v, "apex")
        self.dome_z, self.dome_n = self._height_field(u, v, "dome")
        # lung texture: a coarse random lattice (about 7 mm) interpolated smoothly
        rng = np.random.default_rng(plan.seeds["texture"])
        cell = 7.0
        self.tex_cell = cell
        nyl = int(len(self.y) * grid.spacing[1] / cell) + 3
        nxl = int(len(self.x) * grid.spacing[0] / cell) + 3
        nzl = int(len(grid.z) * grid.spacing[2] / cell) + 3
        self.tex = rng.standard_normal((nzl, nyl, nxl)).astype(f32)
        self.tex_wx = self._interp_weights(self.x - self.x[0], cell)
        self.tex_wy = self._interp_weights(self.y - self.y[0], cell)
        # the table under the flattened back (constant along z), full width
        uu = (grid.x - a.cx)[None, :]
        yy = grid.y[:, None]
        top = a.cy + self.v_flat + 1.0 - 22.0 * (uu / (a.A0 * 1.4)) ** 2
        table = _occ(top - yy, self.width) * _occ(yy - (top + 8.0), self.width) * (np.abs(uu) < a.A0 * 1.45)
        rows = np.flatnonzero(table.max(axis=1) > 0)
        self.table_rows = slice(rows[0], rows[-1] + 1) if len(rows) else slice(0, 0)
        self.table = table[self.table_rows].astype(f32)
        n = plan.shape[1]
        if plan.fov_padding is not None:
            ii = np.arange(n, dtype=f32) - (n - 1) / 2
            self.outside_fov = (ii[None, :] ** 2 + ii[:, None] ** 2) > (n / 2) ** 2
        else:
            self.outside_fov = None

    def local(self, box):
        """Window-relative (ys, xs) of a grid box, or None when it misses the window."""
        out = []
        for s, w in ((box[1], self.ys), (box[2], self.xs)):
            i0, i1 = max(s.start, w.start) - w.start, min(s.stop, w.stop) - w.start
            if i0 >= i1:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    @staticmethod
    def _interp_weights(offsets, cell):
        pos = offsets / cell + 1.0
        i0 = np.floor(pos).astype(np.intp)
        f = pos - i0
        f = (f * f * (3 - 2 * f)).astype(np.float32)
        return i0, f

    def _height_field(self, u, v, kind):
        a = self.a
        zs = np.empty(u.shape, np.float64)
        nrm = np.empty(u.shape, np.float64)
        for side, sel in (("r", u < 0), ("l", u >= 0)):
            if kind == "apex":
                ua, va, c = a.apex[side]
                du, dv = u - ua, v - va
                z = a.z_base + a.height - c * (du * du + dv * dv)
                gu, gv = -2 * c * du, -2 * c * dv
            else:
                ud, vd, ru, rv, h = a.dome[side]
                du, dv = (u - ud) / ru, (v - vd) / rv
                q = du * du + dv * dv
                z = a.z_base + h * np.maximum(1 - q, 0)
                gu = np.where(q < 1, -2 * h * du / ru, 0)
                gv = np.where(q < 1, -2 * h * dv / rv, 0)
            zs[sel] = z[sel]
            nrm[sel] = (1 / np.sqrt(1 + gu * gu + gv * gv))[sel]
        return zs.astype(np.float32), nrm.astype(np.float32)

    def texture(self, iz: int) -> np.ndarray:
        grid = self.grid
        pz = (grid.z[iz] - grid.z[0]) / self.tex_cell + 1.0
        i0 = int(math.floor(pz))
        f = pz - i0
        f = f * f * (3 - 2 * f)
        plane = self.tex[i0] * np.float32(1 - f) + self.tex[i0 + 1] * np.float32(f)
        ix, fx = self.tex_wx
        iy, fy = self.tex_wy
        rows = plane[:, ix] * (1 - fx) + plane[:, ix + 1] * fx
        return rows[iy] * (1 - fy)[:, None] + rows[iy + 1] * fy[:, None]

    def render(self, z: float, texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and lung occupancy of the window at world height ``z``."""
        a, w = self.a, self.width
        hu = a.hu
        f32 = np.float32
        zeta = float(a.zeta(z))
        A, B = a.cavity_axes(zeta)
        A, B = float(A), float(B)
        v1 = self.v1
        inv_a2 = (1.0 / (A * (1.0 + a.egg * np.clip(v1 / B, -1.5, 1.5))) ** 2).astype(f32)
        rho = np.sqrt(self.u2 * inv_a2 + (v1 * f32(1 / B)) ** 2)
        d_cav = (rho - 1) * self.r / np.maximum(rho, f32(1e-3))
        wall_scale = f32(1.0 + 0.35 * min(max((zeta - 0.8) / 0.3, 0.0), 1.0))

        # body: air -> subcutaneous fat -> skin -> muscle (with a fat plane) -> cavity content
        d_body = d_cav - self.w_body * wall_scale
        np.maximum(d_body, v1 - f32(self.v_flat), out=d_body)        # the back flattened on the table
        body = _occ(d_body, w)
        img = f32(-1000.0) + f32(hu["fat"] + 1000.0) * body
        skin = body - _occ(d_body + f32(1.5), w)
        img += (f32(hu["muscle"] - 10) - img) * skin
        d_mus = d_cav - self.w_muscle * wall_scale
        np.maximum(d_mus, v1 - f32(self.v_flat - 4.0), out=d_mus)
        img += (f32(hu["muscle"]) - img) * _occ(d_mus, w)
        plane = _occ(np.abs(d_cav - self.w_plane * wall_scale) - f32(0.9), w) * self.plane_weight
        img += (f32(hu["fat"]) - img) * plane
        cavity = _occ(d_cav, w)
        below_dome = _occ((z - self.dome_z) * self.dome_n, w)
        fill = f32(hu["mediastinal_fat"]) + f32(hu["organ"] - hu["mediastinal_fat"]) * below_dome
        img += (fill - img) * cavity

        # mediastinum: drawn structures, and the distance the lungs keep from them
        d_med = np.abs(self.u1) - f32(a.band) + np.zeros_like(v1)
        for prim in a.prims:
            lo, hi = prim.bounds()
            m = prim.margin + 2 * w
            if z < lo[2] - m or z > hi[2] + m:
                continue
            box = self.grid.box(lo - m, hi + m)
            loc = self.local(box) if box is not None else None
            if loc is None:
                continue
            ys, xs = loc
            x = self.x[xs].astype(f32)[None, :]
            y = self.y[ys].astype(f32)[:, None]
            d = prim.sdf(x, y, f32(z))
            if prim.margin > 0:
                np.minimum(d_med[ys, xs], d - f32(prim.margin), out=d_med[ys, xs])
            if prim.hu is not None:
                win = img[ys, xs]
                win += (f32(prim.hu) - win) * _occ(d, w)
        self._spine(img, z)
        self._chest_wall_bones(img, z, zeta, d_cav)

        # lungs
        d_lung = np.maximum(d_cav, -d_med)
        np.maximum(d_lung, (z - self.apex_z) * self.apex_n, out=d_lung)
        np.maximum(d_lung, (self.dome_z - z) * self.dome_n, out=d_lung)
        lung = _occ(d_lung, w)
        paren = (f32(hu["lung"]) + f32(hu["lung_gradient"] / a.B0) * v1 + f32(hu["lung_texture"]) * texture)
        img += (paren - img) * lung
        return img, lung

    def _spine(self, img, z):
        a, w, sp = self.a, self.width, self.a.spine
        g = a.g
        lo = np.array([a.cx - 45 * g, a.cy + sp["v_vb"] - sp["r_vb"] - 3, z])
        hi = np.array([a.cx + 45 * g, a.cy + sp["v_canal"] + 45 * g, z])
        box = self.grid.box(lo, hi)
        loc = self.local(box) if box is not None else None
        if loc is None:
            return
        ys, xs = loc
        u = self.u1[:, xs]
        v = self.v1[ys, :]
        win = img[ys, xs]
        hu = a.hu
        f32 = np.float32
        phase = (z - a.z_base + sp["phase"]) % sp["period"]
        d_vb = np.sqrt(u * u + (v - f32(sp["v_vb"])) ** 2) - f32(sp["r_vb"])
        body = _occ(d_vb, w)
        if phase < sp["disc"]:
            win += (f32(hu["disc"]) - win) * body
        else:
            win += (f32(hu["cortex"]) - win) * body
            win += (f32(hu["marrow"]) - win) * _occ(d_vb + f32(1.5), w)
        vc, rc = sp["v_canal"], sp["r_canal"]
        d_canal = np.sqrt(u * u + (v - f32(vc)) ** 2)
        bone_hu = f32(0.55 * hu["cortex"] + 0.45 * hu["marrow"])
        arch = _occ(d_canal - f32(rc + 5.0 * g), w) * np.clip((v - f32(vc - 3.0 * g)) * f32(1 / (2.0 * g)), 0, 1)
        spinous = _occ(np.sqrt((u * f32(1 / (4.0 * g))) ** 2 + ((v - f32(vc + 20.0 * g)) * f32(1 / (16.0 * g))) ** 2)
                       * f32(4.0 * g) - f32(4.0 * g), w)
        transverse = _occ(np.sqrt(((np.abs(u) - f32(20.0 * g)) * f32(1 / (12.0 * g))) ** 2
                                  + ((v - f32(vc - 2.0 * g)) * f32(1 / (5.0 * g))) ** 2) * f32(5.0 * g) - f32(5.0 * g), w)
        bone = np.maximum(np.maximum(arch, spinous), transverse)
        win += (bone_hu - win) * bone
        win += (f32(hu["muscle"] - 25) - win) * _occ(d_canal - f32(rc), w)

    def _chest_wall_bones(self, img, z, zeta, d_cav):
        """Ribs, costal cartilage, sternum and scapulae, computed on the ring of the chest wall only."""
        a, w, rb = self.a, self.width, self.a.ribs
        if zeta < -0.25 or zeta > 1.02:
            return
        hu = a.hu
        g = a.g
        f32 = np.float32
        ring = np.flatnonzero(((d_cav > -2 * w) & (d_cav < a.wall["rib"] + 12 * g)).ravel())
        if len(ring) == 0:
            return
        dc = d_cav.ravel()[ring]
        tt = self.abs_theta.ravel()[ring]
        out = img.ravel()[ring]
        # ribs descend anteriorly: the nearest rib centre line at this arc position
        phase = (f32(z - a.z_base + rb["phase"]) + self.rib_s.ravel()[ring]) % f32(rb["pitch"])
        dz = (phase - f32(rb["pitch"] / 2)) * f32(1 / rb["half_height"])
        dr = (dc - f32(rb["depth"])) * f32(1 / rb["half_radial"])
        q = np.sqrt(dz * dz + dr * dr)
        rib = _occ((q - 1) * f32(rb["half_radial"]), w)
        marrow = _occ((q - 0.6) * f32(rb["half_radial"]), w)
        arc = self.rib_arc.ravel()[ring]
        out += (f32(hu["cortex"] * 0.85) - out) * (rib * arc)
        out += (f32(hu["marrow"]) - out) * (marrow * arc)
        out += (f32(hu["cartilage"]) - out) * (rib * self.cartilage_arc.ravel()[ring])
        if 0.12 < zeta < 0.9:   # sternum: a flat oval bone with a marrow core
            uu = np.broadcast_to(self.u1, img.shape).ravel()[ring]
            q = np.sqrt((uu * f32(1 / (15.0 * g))) ** 2 + ((dc - f32(6.0 * g)) * f32(1 / (4.5 * g))) ** 2)
            front = tt > 2.7
            out += (f32(hu["cortex"] * 0.8) - out) * (_occ((q - 1) * f32(4.5 * g), w) * front)
            out += (f32(hu["marrow"]) - out) * (_occ((q - 0.7) * f32(4.5 * g), w) * front)
        if zeta > 0.52:         # scapulae, outside the ribs in the upper chest
            reach = 0.45 + 0.8 * min((zeta - 0.52) / 0.15, 1.0)
            plate = _occ(np.abs(dc - f32(a.wall["rib"] + 6.0 * g)) - f32(2.2 * g), w)
            ang = np.clip((f32(reach) - tt) * f32(20), 0, 1) * np.clip((tt - f32(0.42)) * f32(20), 0, 1)
            out += (f32(0.6 * hu["cortex"] + 0.4 * hu["marrow"]) - out) * (plate * ang)
        img.ravel()[ring] = out


@dataclass
class RenderedScan:
    """Arrays (z, y, x) of one synthetic scan and its annotation rows (world mm)."""

    image: np.ndarray        # int16 HU
    labels: np.ndarray       # uint8, nodule i (row order) = i + 1
    lungs: np.ndarray        # uint8 0/1 true lung mask
    annotations: pd.DataFrame
    geometry: Geometry


def render_scan(plan: ScanPlan) -> RenderedScan:
    """Render a planned scan (see the module docstring for what is drawn and how)."""
    grid = _Grid(plan)
    nz, ny, nx = plan.shape
    t = plan.slice_thickness
    width = float(grid.spacing[0])
    vol = np.empty(plan.shape, np.float32)
    lung_q = np.empty(plan.shape, np.uint8)
    renderer = _SliceRenderer(plan, grid)
    k_a = max(1, math.ceil(t / 1.25 - 1e-9))
    offsets = ((np.arange(k_a) + 0.5) / k_a - 0.5) * t
    win = (renderer.ys, renderer.xs)
    for iz in range(nz):
        tex = renderer.texture(iz)
        acc_img, acc_lung = None, None
        for off in offsets:
            img, lung = renderer.render(float(grid.z[iz] + off), tex)
            if acc_img is None:
                acc_img, acc_lung = img, lung
            else:
                acc_img += img
                acc_lung += lung
        if k_a > 1:
            acc_img *= np.float32(1 / k_a)
            acc_lung *= np.float32(1 / k_a)
        plane = vol[iz]
        plane.fill(-1000.0)
        plane[win] = acc_img
        rows = plane[renderer.table_rows]
        rows += (np.float32(plan.anatomy.hu["table"]) - rows) * renderer.table
        lung_q[iz].fill(0)
        lung_q[iz][win] = np.rint(acc_lung * 255)

    a = plan.anatomy
    k_v = max(1, math.ceil(t / 0.6 - 1e-9))
    # trachea and main bronchi: wall, then lumen; not lung
    main = Segments(np.array([p.a for p, _ in a.main_airways]), np.array([p.b for p, _ in a.main_airways]),
                    np.array([p.r0 for p, _ in a.main_airways]), np.array([p.r1 for p, _ in a.main_airways]),
                    np.full(len(a.main_airways), a.hu["muscle"] - 10))
    _render_tubes(vol, lung_q, grid, main, k_v, width, clip_to_lung=False, exclude_from_lung=True)
    ratio = a.main_airways[0][1] if a.main_airways else 0.8
    _render_tubes(vol, lung_q, grid, main, k_v, width, clip_to_lung=False, radius_scale=ratio,
                  hu_override=-1000.0)
    # intrapulmonary bronchi, vessels, nodules
    _render_tubes(vol, lung_q, grid, plan.airways, k_v, width, clip_to_lung=True)
    _render_tubes(vol, lung_q, grid, plan.airways, k_v, width, clip_to_lung=True,
                  radius_scale=plan.airway_lumen_ratio, hu_override=-990.0)
    _render_tubes(vol, lung_q, grid, plan.vessels, k_v, width, clip_to_lung=True)
    spicules = nodule_spicules(plan.nodules)
    _render_tubes(vol, lung_q, grid, spicules, k_v, width, clip_to_lung=True)
    labels = np.zeros(plan.shape, np.uint8)
    for i, nodule in enumerate(plan.nodules, start=1):
        _render_nodule(vol, lung_q, labels, grid, nodule, i, width)

    # acquisition: correlated Gaussian noise, reconstruction circle, int16
    rng = np.random.default_rng(plan.seeds["noise"])
    image = np.empty(plan.shape, np.int16)
    sigma = np.float32(plan.noise_sigma / 0.375)  # 3-tap binomial blur in x and y keeps 0.375 of sigma
    for iz in range(nz):
        noise = rng.standard_normal((ny + 2, nx + 2), dtype=np.float32)
        noise = 0.25 * noise[:-2] + 0.5 * noise[1:-1] + 0.25 * noise[2:]
        noise = 0.25 * noise[:, :-2] + 0.5 * noise[:, 1:-1] + 0.25 * noise[:, 2:]
        s = vol[iz] + sigma * noise
        if renderer.outside_fov is not None:
            s[renderer.outside_fov] = plan.fov_padding
        np.clip(np.rint(s), -32768, 32767, out=s)
        image[iz] = s
    del vol

    lungs = (lung_q >= 128).astype(np.uint8)
    annotations = _annotations(plan, labels, grid)
    return RenderedScan(image=image, labels=labels, lungs=lungs, annotations=annotations, geometry=plan.geometry)


#: per-scan nodule files: the LUNA16 columns, then what LIDC readers rate and the generator knows
NODULE_COLUMNS = ANNOTATION_COLUMNS + ["texture", "location"]


def _annotations(plan: ScanPlan, labels: np.ndarray, grid: _Grid) -> pd.DataFrame:
    """One row per nodule: the LUNA16 columns (the centroid of its label, world mm; a label voxel
    guaranteed), plus its ``texture`` and ``location`` (:data:`NODULE_COLUMNS`)."""
    rows = []
    for i, nodule in enumerate(plan.nodules, start=1):
        c = np.asarray(nodule.center)
        ext = nodule.extent_mm + 2 * grid.spacing[2]
        box = grid.box(c - ext, c + ext)
        idx = np.argwhere(labels[box] == i) if box is not None else np.zeros((0, 3))
        if len(idx) == 0:
            raise RuntimeError(f"scan {plan.uid}: nodule {i} has no voxel in its label map")
        idx = idx + np.array([box[0].start, box[1].start, box[2].start])
        centroid = idx.mean(axis=0)
        voxel = np.rint(centroid).astype(int)
        if labels[tuple(voxel)] != i:
            nearest = idx[np.argmin(((idx - centroid) ** 2).sum(axis=1))]
            centroid = nearest.astype(float)
        world = voxel_to_world(centroid, plan.geometry)
        rows.append({"seriesuid": plan.uid, "coordX": float(world[0]), "coordY": float(world[1]),
                     "coordZ": float(world[2]), "diameter_mm": round(float(nodule.diameter_mm), 3),
                     "texture": nodule.texture, "location": nodule.location})
    return pd.DataFrame(rows, columns=NODULE_COLUMNS)


# =========================================================================== files


def make_scan(uid: str, cfg: Mapping) -> tuple[ScanPlan, RenderedScan]:
    """Plan and render the scan with seriesuid ``uid`` of the cohort ``cfg`` describes."""
    cfg = validate_config(cfg)
    index = scan_index(uid, cfg["seed"])
    plan = plan_scan(index, cfg, uid=uid)
    return plan, render_scan(plan)


def synthesize_scan(uid: str, cfg: Mapping, out_scan: str | Path, out_mask: str | Path,
                    out_lungs: str | Path, out_nodules: str | Path) -> None:
    """Write one synthetic scan: ``out_scan`` (.mhd + .raw, int16 HU), ``out_mask`` (uint8 nodule
    labels, id = row order in ``out_nodules``), ``out_lungs`` (uint8 true lung mask) and
    ``out_nodules`` (LUNA16 rows, world mm, plus texture and location; header even when empty). Every
    file written atomically.

    ``cfg`` is the ``synthetic`` block (``n_scans`` is ignored: a scan never depends on it).
    """
    started = time.perf_counter()
    plan, scan = make_scan(uid, cfg)
    write_image(scan.image, scan.geometry, out_scan)
    write_image(scan.labels, scan.geometry, out_mask)
    write_image(scan.lungs, scan.geometry, out_lungs)
    write_csv_atomic(scan.annotations, out_nodules)
    nz, ny, nx = plan.shape
    log.info("scan %s (index %d): %dx%dx%d voxels, spacing %.4f mm, %.2f mm slices, noise %.1f HU, "
             "%d nodule(s) [%s], %.1f s", uid, plan.index, nx, ny, nz, plan.geometry.spacing[0],
             plan.slice_thickness, plan.noise_sigma, len(plan.nodules),
             ", ".join(f"{n.diameter_mm:.1f} mm {n.texture} {n.location}" for n in plan.nodules),
             time.perf_counter() - started)


def merge_annotations(nodule_csvs: Iterable[str | Path], out_csv: str | Path,
                      out_strata: str | Path | None = None) -> None:
    """Concatenate per-scan nodule files ``{seriesuid}.csv`` (in the order given) into one LUNA16
    ``annotations.csv`` (its five columns). With ``out_strata``, also write ``seriesuid,stratum``
    (one row per file, sorted by uid): :func:`texture_stratum` of the scan's nodules, which
    ``split_folds`` stratifies by so the rare subsolid nodules spread over the folds."""
    paths = [Path(p) for p in nodule_csvs]
    frames = [read_annotations(path) for path in paths]
    shown = [f[ANNOTATION_COLUMNS] for f in frames if len(f)]
    table = pd.concat(shown, ignore_index=True) if shown else pd.DataFrame(columns=ANNOTATION_COLUMNS)
    if out_strata is not None:
        rows = []
        for path, frame in zip(paths, frames):
            if len(frame) and "texture" not in frame.columns:
                raise InputError(f"{path}: no texture column (written by an older noduleflow: delete the "
                                 f"synthetic cohort folder to regenerate it)")
            try:
                stratum = texture_stratum(frame["texture"] if len(frame) else [])
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from exc
            rows.append((path.name[:-len(".csv")], stratum))
        strata = pd.DataFrame(rows, columns=["seriesuid", "stratum"]).sort_values("seriesuid", kind="stable")
        write_csv_atomic(strata, out_strata)
        log.info("strata: %s -> %s", ", ".join(f"{s} {n}" for s, n in strata["stratum"].value_counts(
            sort=False).sort_index().items()), out_strata)
    write_csv_atomic(table, out_csv)
    log.info("annotations: %d nodule(s) from %d scan file(s) -> %s", len(table), len(paths), out_csv)


def texture_stratum(textures: Iterable[str]) -> str:
    """A scan's stratum from its nodules' textures: ``subsolid`` when one is part-solid or ground
    glass (rare, and the hardest to learn), else ``solid``, or ``none`` without nodules."""
    textures = [str(t) for t in textures]
    unknown = sorted(set(textures) - set(TEXTURES))
    if unknown:
        raise InputError(f"unknown nodule texture {unknown[0]!r} (expected one of {', '.join(TEXTURES)})")
    if not textures:
        return "none"
    return "solid" if all(t == "solid" for t in textures) else "subsolid"


def synthesize_cohort(cfg: Mapping, output: str | Path | None = None, n_scans: int | None = None) -> list[str]:
    """Write the first ``n_scans`` (default ``cfg["n_scans"]``) scans and ``annotations.csv`` in the
    LUNA16 layout under ``output`` (default ``cfg["output"]``), with ``strata.csv``, as the workflow
    does. Returns the uids."""
    full = validate_config(cfg)
    n = int(n_scans if n_scans is not None else cfg.get("n_scans", 20))
    root = Path(output if output is not None else full["output"])
    uids = cohort_uids(n, full["seed"])
    for uid in uids:
        synthesize_scan(uid, cfg, root / "subset0" / f"{uid}.mhd", root / "masks" / f"{uid}.mha",
                        root / "lungs" / f"{uid}.mha", root / "nodules" / f"{uid}.csv")
    merge_annotations([root / "nodules" / f"{u}.csv" for u in uids], root / "annotations.csv",
                      root / "strata.csv")
    return uids
