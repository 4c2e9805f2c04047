"""Stage ``sample_patches``: balanced 2D training patches from every scan's slice store.

A nodule covers well under 0.1 % of a slice's pixels, so training on whole slices teaches "no
nodule". This stage draws, from every scan, ``patches_per_scan`` square patches (``patch_size``
pixels at the resampled spacing, cut in the ``planes`` given: axial, coronal and/or sagittal, see
:mod:`noduleflow.planes`; every count below is split evenly over the planes) of three kinds:

* **positive** — centred near a nodule: pick one of the scan's nodules uniformly (so small nodules
  are not starved by large ones), then one of its voxels uniformly (any slice that shows the
  nodule can be drawn), then move the centre by a uniform integer jitter of up to
  ``jitter_fraction * patch_size / 2`` pixels in y and x. The jitter is capped so that the drawn
  nodule voxel always stays inside the patch: every positive patch contains nodule pixels.
* **hard_negative** — centred on a lung voxel brighter than ``hard_negative_min_hu`` (vessels,
  pleura, airway walls: what a detector confuses with nodules), whose patch has no nodule pixel.
  A ``thick_negative_fraction`` share of them must also lie inside a *thick* bright structure
  (:func:`thick_structures`: the lung smoothed with a Gaussian of ``thick_negative_sigma_mm`` is
  still brighter than ``hard_negative_min_hu`` there): hilar vessels, vessel junctions, lymph
  nodes in the lung, airway walls — the round, nodule-sized things behind most confident false
  positives, which a uniform draw over bright voxels (mostly thin vessels) rarely shows.
* **negative** — centred on a region-of-interest voxel (the lung mask when ``lung_roi``, else the
  body: HU > -500 or lung) whose patch has no nodule pixel.

Counts (:func:`noduleflow.patchplan.patch_counts`): the cohort of S scans gets
``S * patches_per_scan`` patches, of which
``P = round(S * patches_per_scan * positive_fraction)`` are positive, so the *realised* positive
fraction is the configured one (to rounding) even though scans without nodules cannot give any
positives. The negatives are split evenly over all scans, the positives evenly over the
nodule-bearing scans (which therefore give more than ``patches_per_scan`` patches, the others fewer).
Of a scan's negatives, ``round(negatives * hard_negative_fraction)`` are hard negatives (fewer when the
scan has fewer such voxels: each is used once, and plain negatives fill in). Negative centres are
drawn without replacement (plain negatives with replacement only in a scan with too few voxels).

**Draws** (``draws`` = D): each scan gives D independent sets of these patches (the same counts,
centres drawn afresh), and training uses set ``(epoch - 1) mod D`` in each epoch, so with D equal
to the epochs every epoch sees new patches instead of the same ones again (nnU-Net samples its
patches on the fly for the same reason; drawing them here keeps training reproducible and lets
the five folds share one sampling). Draw 0 is the set a run with ``draws: 1`` gets; validation and
the held-out patch Dice use draw 0 only. The scan's thick-structure map is computed once for
all draws.

Each patch has ``c = 2 * context + 1`` channels: the slices ``s + j * context_step`` for ``j = -context
.. context`` of its plane around the centre slice ``s`` (indices clamped at the volume ends, so edge
slices repeat). A ``context_step`` above 1 widens the view across the plane at no extra cost: with
``context = 2, context_step = 3`` at 1 mm the channels span 12 mm, enough to tell a nodule (a
sphere, smaller a few mm off its centre) from a vessel seen end-on (a tube, the same disc on every
slice), which ``context_step = 1`` (4 mm) cannot for vessels and nodules of ~1 cm.
Pixels outside the volume are -1000 HU (image) and 0 (masks). With ``lung_roi`` every channel is masked by its own slice's lung mask
(:func:`noduleflow.intensity.apply_roi`: outside -> -1000 HU), exactly as at inference; with
``roi_margin_mm`` > 0 by the lung mask grown by that margin in 3-D
(:func:`noduleflow.intensity.visible_region`), so a structure at the lung's edge is seen with
what it is attached to (the chest wall, the mediastinum).

Jobs: :func:`noduleflow.patchplan.plan_patches` (stage ``plan_patches``) writes the cohort's counts
per scan (``patches/plan.csv``); :func:`sample_scan_file` (stage ``sample_patches``, one job per scan) writes
that scan's patches to ``patches/scans/{seriesuid}.h5``. A scan is sampled again only when its slice
store, its counts or a sampling setting changes. :func:`sample_balanced_patches` does the same in
one process into one file (tests, benchmarks); training reads either as one sequence of patches
(:class:`noduleflow.patchdata.PatchFile`).

Output, per scan or for the cohort (written atomically): ``image`` int16 HU (n, c, h, w), ``mask``
uint8 0/1 nodule of the centre slice (n, h, w), ``roi`` uint8 (n, h, w) (lung mask of the centre slice, or all
ones without ``lung_roi``), all chunked one patch per chunk and gzip-compressed; the table
``seriesuid`` (bytes), ``z``, ``y``, ``x`` (int32 centre voxel, (z, y, x) whatever the plane), ``kind``
and ``plane`` (bytes), ``draw`` (int32); attrs ``context``, ``context_step``, ``patch_size``,
``lung_roi``, ``seed``, ``planes``, ``draws`` and the other sampling settings. Patches are stored
scan by scan in seriesuid order; within a scan draw by draw, within a draw plane by plane (axial,
coronal, sagittal), and within a plane positives, then hard negatives, then negatives.

Determinism: every scan draws from its own generators, seeded by ``(seed, sha256(seriesuid))`` for
draw 0 and ``(seed, sha256(seriesuid), d)`` for draw d >= 1, so the file is identical for the same
slice stores and settings, whatever the order of ``slice_files``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from noduleflow.intensity import AIR_HU, BODY_MIN_HU, apply_roi, visible_region
from noduleflow.io import InputError, atomic_path, open_h5
from noduleflow.patchplan import plan_counts
from noduleflow.planes import PLANES, check_planes, context_offsets, indices_from_plane, split_count, to_plane

log = logging.getLogger(__name__)

KINDS = ("positive", "hard_negative", "negative")
#: per-patch chunks, compressed (fast gzip level with byte shuffle)
COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
PATCH_DATASETS = ("image", "mask", "roi")
TABLE_DATASETS = ("seriesuid", "z", "y", "x", "kind", "plane", "draw")


# --------------------------------------------------------------------------- the stage


def sample_balanced_patches(slice_files: Sequence[str | Path], out_h5: str | Path, lung_roi: bool,
                            patches_per_scan: int = 160, positive_fraction: float = 0.5,
                            **settings: Any) -> dict:
    """Sample balanced patches from every slice store in ``slice_files`` into one file ``out_h5``
    (the whole cohort in one process: tests and benchmarks; the pipeline runs :func:`plan_patches`
    once and :func:`sample_scan_file` per scan, which gives the same patches scan by scan).

    ``settings``: the other ``sampling:`` keys (:func:`sample_scan`). Returns a summary:
    ``n_patches``, a count per kind, and the realised ``positive_fraction``. Raises InputError
    (naming the file) for a missing or malformed slice store or a seriesuid found twice,
    ValueError (naming the ``sampling.*`` key) for a bad setting — before anything is written.
    """
    check_settings(patches_per_scan=patches_per_scan, positive_fraction=positive_fraction, **settings)
    plan = plan_counts(slice_files, patches_per_scan, positive_fraction)
    started = time.perf_counter()
    attrs = patch_file_attrs(lung_roi, patches_per_scan, positive_fraction, **settings)
    with atomic_path(out_h5) as tmp, PatchWriter(tmp, attrs) as writer:
        for i, row in enumerate(plan.itertuples(index=False), 1):
            patches, table = sample_scan(row.path, lung_roi=lung_roi, n_positive=row.n_positive,
                                         n_negative=row.n_negative, **settings)
            writer.append(patches, table)
            _log_scan(f"[{i}/{len(plan)}] {row.seriesuid}", table, time.perf_counter() - started)
        summary = writer.summary()
    _check_fraction(summary, positive_fraction)
    log.info("wrote %s: %d patches (%d positive = %.4f, %d hard negative, %d negative) in %.1f s", out_h5,
             summary["n_patches"], summary["positive"], summary["positive_fraction"], summary["hard_negative"],
             summary["negative"], time.perf_counter() - started)
    return summary


def sample_scan_file(slice_file: str | Path, out_h5: str | Path, lung_roi: bool, n_positive: int, n_negative: int,
                     patches_per_scan: int = 160, positive_fraction: float = 0.5, **settings: Any) -> dict:
    """Stage ``sample_patches`` for one scan: its ``n_positive`` + ``n_negative`` patches (counts from
    the plan, :func:`noduleflow.patchplan.read_plan`) written to ``out_h5`` in the patches-file format. The patches are
    those :func:`sample_balanced_patches` gives this scan (same generator, same counts). Returns the
    summary of the file (``n_patches``, a count per kind)."""
    check_settings(patches_per_scan=patches_per_scan, positive_fraction=positive_fraction, **settings)
    started = time.perf_counter()
    patches, table = sample_scan(slice_file, lung_roi=lung_roi, n_positive=n_positive, n_negative=n_negative,
                                 **settings)
    attrs = patch_file_attrs(lung_roi, patches_per_scan, positive_fraction, **settings)
    with atomic_path(out_h5) as tmp, PatchWriter(tmp, attrs) as writer:
        writer.append(patches, table)
        summary = writer.summary()
    _log_scan(str(slice_file), table, time.perf_counter() - started)
    return summary


def _log_scan(label: str, table: Mapping[str, np.ndarray], seconds: float) -> None:
    got = {k: int(np.count_nonzero(table["kind"] == k)) for k in KINDS}
    log.info("%s: %d positive, %d hard negative, %d negative (%.2f s)", label, got["positive"],
             got["hard_negative"], got["negative"], seconds)


def _check_fraction(summary: Mapping[str, Any], positive_fraction: float) -> None:
    if abs(summary["positive_fraction"] - positive_fraction) > 0.02:
        log.warning("realised positive fraction %.4f differs from sampling.positive_fraction = %.4f: "
                    "too few scans with nodules", summary["positive_fraction"], positive_fraction)


def patch_file_attrs(lung_roi: bool, patches_per_scan: int, positive_fraction: float, patch_size: int = 64,
                     context: int = 3, hard_negative_fraction: float = 0.5, hard_negative_min_hu: float = -500,
                     jitter_fraction: float = 0.35, seed: int = 0, planes: Sequence[str] = PLANES,
                     thick_negative_fraction: float = 0.5, thick_negative_sigma_mm: float = 2.0,
                     context_step: int = 2, draws: int = 1, roi_margin_mm: float = 0.0,
                     edge_negative_fraction: float = 0.0) -> dict[str, Any]:
    """The attributes of a patches file: every sampling setting (what inference must repeat, and
    what tells two files apart)."""
    return {"context": int(context), "context_step": int(context_step), "patch_size": int(patch_size),
            "lung_roi": bool(lung_roi), "seed": int(seed), "patches_per_scan": int(patches_per_scan),
            "positive_fraction": float(positive_fraction),
            "hard_negative_fraction": float(hard_negative_fraction),
            "hard_negative_min_hu": float(hard_negative_min_hu),
            "jitter_fraction": float(jitter_fraction), "fill_hu": AIR_HU,
            "thick_negative_fraction": float(thick_negative_fraction),
            "thick_negative_sigma_mm": float(thick_negative_sigma_mm),
            "planes": ",".join(check_planes(planes, "sampling.planes")), "draws": int(draws),
            "roi_margin_mm": float(roi_margin_mm), "edge_negative_fraction": float(edge_negative_fraction)}


class PatchWriter:
    """Appends patches to an open patches file (the format of the module docstring): datasets grow
    scan by scan, the table is written on close. Use as a context manager on a temporary path."""

    def __init__(self, path: str | Path, attrs: Mapping[str, Any]):
        import h5py

        self.file = h5py.File(path, "w")
        c, size = 2 * int(attrs["context"]) + 1, int(attrs["patch_size"])
        self.datasets = {
            name: self.file.create_dataset(name, shape=(0,) + shape, maxshape=(None,) + shape, dtype=dtype,
                                           chunks=(1,) + shape, track_times=False, **COMPRESSION)
            for name, shape, dtype in (("image", (c, size, size), np.int16), ("mask", (size, size), np.uint8),
                                       ("roi", (size, size), np.uint8))}
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self.tables: list[dict[str, np.ndarray]] = []
        self.written = 0

    def append(self, patches: Mapping[str, np.ndarray], table: Mapping[str, np.ndarray]) -> None:
        n = len(table["z"])
        for name in PATCH_DATASETS:
            self.datasets[name].resize(self.written + n, axis=0)
            self.datasets[name][self.written:self.written + n] = patches[name]
        self.written += n
        self.tables.append(dict(table))

    def table(self) -> dict[str, np.ndarray]:
        if not self.tables:
            return {name: np.zeros(0, dtype=str if name in ("seriesuid", "kind", "plane") else np.int32)
                    for name in TABLE_DATASETS}
        return {k: np.concatenate([t[k] for t in self.tables]) for k in TABLE_DATASETS}

    def summary(self) -> dict[str, Any]:
        kinds = self.table()["kind"]
        summary = {"n_patches": self.written, **{k: int(np.count_nonzero(kinds == k)) for k in KINDS}}
        summary["positive_fraction"] = summary["positive"] / max(self.written, 1)
        return summary

    def __enter__(self) -> "PatchWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if exc_info[0] is None:
                table = self.table()
                uid_len = max([len(u.encode()) for u in table["seriesuid"]] + [1])
                self.file.create_dataset("seriesuid", data=table["seriesuid"].astype(f"S{uid_len}"),
                                         track_times=False)
                for axis in ("z", "y", "x"):
                    self.file.create_dataset(axis, data=table[axis].astype(np.int32), track_times=False)
                self.file.create_dataset("kind", data=table["kind"].astype(f"S{max(len(k) for k in KINDS)}"),
                                         track_times=False)
                self.file.create_dataset("plane", data=table["plane"].astype(f"S{max(len(p) for p in PLANES)}"),
                                         track_times=False)
                self.file.create_dataset("draw", data=table["draw"].astype(np.int32), track_times=False)
        finally:
            self.file.close()


def check_settings(patch_size: int = 64, context: int = 3, patches_per_scan: int = 160,
                   positive_fraction: float = 0.5, hard_negative_fraction: float = 0.5, jitter_fraction: float = 0.35,
                   thick_negative_fraction: float = 0.5, thick_negative_sigma_mm: float = 2.0, context_step: int = 2,
                   planes: Sequence[str] = PLANES, draws: int = 1, roi_margin_mm: float = 0.0,
                   edge_negative_fraction: float = 0.0, **_other: Any) -> None:
    """ValueError naming the ``sampling.*`` key of the first invalid setting."""
    check_planes(planes, "sampling.planes")
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or int(draws) < 1:
        raise ValueError(f"sampling.draws = {draws!r}: must be an integer >= 1")
    if int(patch_size) < 2:
        raise ValueError(f"sampling.patch_size = {patch_size}: must be at least 2 pixels")
    if int(context) < 0:
        raise ValueError(f"sampling.context = {context}: must be >= 0")
    if int(context_step) < 1:
        raise ValueError(f"sampling.context_step = {context_step}: must be >= 1 slice")
    if int(patches_per_scan) < 1:
        raise ValueError(f"sampling.patches_per_scan = {patches_per_scan}: must be >= 1")
    for key, value in (("positive_fraction", positive_fraction),
                       ("hard_negative_fraction", hard_negative_fraction), ("jitter_fraction", jitter_fraction),
                       ("thick_negative_fraction", thick_negative_fraction),
                       ("edge_negative_fraction", edge_negative_fraction)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"sampling.{key} = {value}: must be in [0, 1]")
    if not float(thick_negative_sigma_mm) > 0:
        raise ValueError(f"sampling.thick_negative_sigma_mm = {thick_negative_sigma_mm}: must be > 0 mm")
    if isinstance(roi_margin_mm, bool) or not float(roi_margin_mm) >= 0:
        raise ValueError(f"sampling.roi_margin_mm = {roi_margin_mm}: must be >= 0 mm")


# --------------------------------------------------------------------------- one scan


def scan_rng(seed: int, uid: str, draw: int = 0) -> np.random.Generator:
    """The generator of one scan's draw: seeded by (seed, sha256 of the seriesuid) for draw 0 and
    (seed, sha256 of the seriesuid, draw) for the others; independent of the order of the scans."""
    digest = hashlib.sha256(uid.encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([int(seed), *words] + ([int(draw)] if draw else []))


def sample_scan(path: str | Path, lung_roi: bool, n_positive: int, n_negative: int, patch_size: int = 64,
                context: int = 3, hard_negative_fraction: float = 0.5, hard_negative_min_hu: float = -500,
                jitter_fraction: float = 0.35, seed: int = 0, planes: Sequence[str] = PLANES,
                thick_negative_fraction: float = 0.5,
                thick_negative_sigma_mm: float = 2.0,
                context_step: int = 2, draws: int = 1,
                roi_margin_mm: float = 0.0,
                edge_negative_fraction: float = 0.0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Patches of one slice store: (``{"image", "mask", "roi"}``, table ``{"seriesuid", "z", "y", "x",
    "kind", "plane", "draw"}``), ``draws`` sets of: ``n_positive`` positives (none if the scan has
    no nodule voxel) and ``n_negative`` negatives, of which a ``hard_negative_fraction`` share hard
    ones (a ``thick_negative_fraction`` share of these inside thick structures,
    :func:`thick_structures`), each count split evenly over ``planes``
    (:func:`noduleflow.planes.split_count`). Centres in the table are (z, y, x) voxel indices
    whatever the plane. Generator: :func:`scan_rng` of each draw, used plane after plane in
    :data:`PLANES` order; draws in order 0 .. ``draws`` - 1. With ``lung_roi`` the image is kept
    within ``roi_margin_mm`` of the lung (:func:`noduleflow.intensity.visible_region`), air beyond;
    centres and the ``roi`` (loss) mask stay the lung's."""
    from noduleflow.slices import read_slice_store

    path = Path(path)
    planes = check_planes(planes, "sampling.planes")
    image, lung, nodule, geometry = read_slice_store(path)
    with open_h5(path) as store:
        uid = store.attrs["seriesuid"]
        uid = uid.decode() if isinstance(uid, bytes) else str(uid)
    for name, array in (("lung", lung), ("nodule", nodule)):
        if array.shape != image.shape:
            raise InputError(f"{path}: {name} {array.shape} and image {image.shape} differ in shape (z, y, x)")
    thick = (thick_structures(image, lung, geometry.spacing, thick_negative_sigma_mm, hard_negative_min_hu)
             if (thick_negative_fraction > 0 or edge_negative_fraction > 0) and hard_negative_fraction > 0 else None)
    edge = (edge_structures(thick, lung, geometry.spacing)
            if thick is not None and edge_negative_fraction > 0 else None)
    # with no margin the lung mask itself bounds the image (cut_patches' default): no second mask
    visible = (visible_region(lung, tuple(geometry.spacing)[::-1], roi_margin_mm)
               if lung_roi and float(roi_margin_mm) > 0 else None)
    rngs = [scan_rng(seed, uid, draw) for draw in range(int(draws))]
    parts: list[list[dict]] = [[] for _ in rngs]   # per draw, plane after plane
    tables: list[list[dict]] = [[] for _ in rngs]
    for plane, n_pos, n_neg in zip(planes, split_count(n_positive, planes), split_count(n_negative, planes)):
        img_p, lung_p, nod_p = (to_plane(a, plane) for a in (image, lung, nodule))
        chosen = choose_centres(img_p, lung_p, nod_p, rngs, lung_roi=lung_roi, n_positive=n_pos,
                                n_negative=n_neg, patch_size=patch_size,
                                hard_negative_fraction=hard_negative_fraction,
                                hard_negative_min_hu=hard_negative_min_hu, jitter_fraction=jitter_fraction,
                                thick=None if thick is None else to_plane(thick, plane),
                                thick_negative_fraction=thick_negative_fraction,
                                edge=None if edge is None else to_plane(edge, plane),
                                edge_negative_fraction=edge_negative_fraction)
        for draw, (centres, kinds) in enumerate(chosen):
            if len(kinds) < n_pos + n_neg:
                log.warning("%s (%s): only %d of %d patches (%s)", uid, plane, len(kinds), n_pos + n_neg,
                            "no nodule voxel" if n_pos and "positive" not in kinds else "too few voxels")
            parts[draw].append(cut_patches(img_p, lung_p, nod_p, centres, patch_size=patch_size, context=context,
                                           lung_roi=lung_roi, context_step=context_step,
                                           visible=None if visible is None else to_plane(visible, plane)))
            zyx = indices_from_plane(centres, plane)
            tables[draw].append({"seriesuid": np.full(len(kinds), uid, dtype=object).astype(str),
                                 "z": zyx[:, 0], "y": zyx[:, 1], "x": zyx[:, 2],
                                 "kind": np.asarray(kinds, dtype=str),
                                 "plane": np.full(len(kinds), plane, dtype=object).astype(str),
                                 "draw": np.full(len(kinds), draw, dtype=np.int32)})
    in_order = [p for draw_parts in parts for p in draw_parts]
    rows = [t for draw_tables in tables for t in draw_tables]
    patches = {name: np.concatenate([p[name] for p in in_order]) for name in PATCH_DATASETS}
    table = {name: np.concatenate([t[name] for t in rows]) for name in rows[0]}
    return patches, table


def choose_centres(image: np.ndarray, lung: np.ndarray, nodule: np.ndarray, rngs: Sequence[np.random.Generator],
                   lung_roi: bool, n_positive: int, n_negative: int, patch_size: int,
                   hard_negative_fraction: float, hard_negative_min_hu: float,
                   jitter_fraction: float, thick: np.ndarray | None = None,
                   thick_negative_fraction: float = 0.5, edge: np.ndarray | None = None,
                   edge_negative_fraction: float = 0.0) -> list[tuple[np.ndarray, list[str]]]:
    """For each generator of ``rngs`` (one per draw): patch centres (k, 3) int64 voxel indices and
    their kinds (positives, then hard negatives, then negatives). Volumes image HU, lung 0/1, nodule
    ids, all in one axis order (slices along axis 0: (z, y, x) for axial patches, see
    :func:`noduleflow.planes.to_plane`); centres in that order. ``thick`` (bool, same order): voxels
    inside thick structures, from which a ``thick_negative_fraction`` share of the hard negatives is
    drawn first (the rest, and any shortfall, from all bright lung voxels); ``edge`` (bool, same
    order): thick structures at the lung's edge (:func:`edge_structures`), from which an
    ``edge_negative_fraction`` share of the hard negatives is drawn before those. The candidate voxels of
    each kind are found once, on the first generator that needs them, and every generator draws
    from them, so a draw's centres depend only on its own generator."""
    n_neg = int(n_negative)
    n_hard = int(round(n_neg * hard_negative_fraction))
    n_edge = int(round(n_hard * edge_negative_fraction)) if edge is not None else 0
    n_thick = min(int(round(n_hard * thick_negative_fraction)), n_hard - n_edge) if thick is not None else 0
    blocked = nodule_windows(nodule, patch_size)  # z -> centres whose patch holds a nodule pixel

    def nodule_free(candidates: np.ndarray) -> np.ndarray:
        for z, block in blocked.items():
            candidates[z] &= ~block
        return candidates

    lung_b = lung > 0
    bright = nodule_free(lung_b & (image > hard_negative_min_hu)) if n_hard else None
    bright_thick = bright & thick if n_thick else None
    bright_edge = bright & edge if n_edge else None
    pools: dict[str, np.ndarray] = {}  # plain-negative voxels, found when first needed
    chosen = []
    for rng in rngs:
        positives = positive_centres(nodule, rng, n_positive, patch_size, jitter_fraction)
        hard = np.zeros((0, 3), dtype=np.int64)
        if n_hard:
            if n_edge:
                hard = _draw(bright_edge, n_edge, rng, replace=False)
            if n_thick:
                hard = np.concatenate([hard, _draw(bright_thick, n_thick, rng, replace=False)])
            hard = np.concatenate([hard, _draw(bright, n_hard - len(hard), rng, replace=False)])
        n_plain = n_neg - len(hard)
        plain = np.zeros((0, 3), dtype=np.int64)
        if n_plain:
            if "roi" not in pools:
                pools["roi"] = nodule_free(lung_b if lung_roi else (lung_b | (image > BODY_MIN_HU)))
            plain = _draw(pools["roi"], n_plain, rng, replace=True)
        if len(plain) < n_plain:  # no ROI voxel with a nodule-free patch: anywhere nodule-free
            if "anywhere" not in pools:
                pools["anywhere"] = nodule_free(np.ones(nodule.shape, dtype=bool))
            plain = np.concatenate([plain, _draw(pools["anywhere"], n_plain - len(plain), rng, replace=True)])
        centres = np.concatenate([positives, hard, plain]).astype(np.int64)
        kinds = ["positive"] * len(positives) + ["hard_negative"] * len(hard) + ["negative"] * len(plain)
        chosen.append((centres, kinds))
    return chosen


#: thick-structure voxels this close (mm) to the lung mask's edge are edge structures
EDGE_DISTANCE_MM = 5.0


def edge_structures(thick: np.ndarray, lung: np.ndarray, spacing_xyz: Sequence[float],
                    distance_mm: float = EDGE_DISTANCE_MM) -> np.ndarray:
    """Bool (z, y, x): the voxels of the thick structures (``thick``, :func:`thick_structures`)
    within ``distance_mm`` of a non-lung voxel (Euclidean, voxel size ``spacing_xyz`` in mm, lung
    mask ``lung`` (z, y, x)). These are what a lung ROI shows as blobs on the pleura: lymph nodes
    bulging from the mediastinum, hilar vessels and bronchi where the mask cuts them."""
    from scipy import ndimage

    if not thick.any():
        return np.zeros(thick.shape, dtype=bool)
    spacing_zyx = tuple(float(v) for v in spacing_xyz)[::-1]
    return thick & (ndimage.distance_transform_edt(np.asarray(lung) > 0, sampling=spacing_zyx) <= distance_mm)


def thick_structures(image: np.ndarray, lung: np.ndarray, spacing_xyz: Sequence[float], sigma_mm: float,
                     min_hu: float) -> np.ndarray:
    """Bool (z, y, x): lung voxels inside bright structures at least about ``2 * sigma_mm`` across.

    The image (HU, (z, y, x)) with everything outside the lung set to air (-1000 HU, so the chest
    wall and mediastinum do not count) is smoothed with a Gaussian of ``sigma_mm`` (per-axis sigma
    from ``spacing_xyz`` in mm); a voxel qualifies where both it and the smoothed image exceed
    ``min_hu``. A thin vessel (radius 1.5 mm) smooths to about -630 HU at sigma 2 mm and drops out;
    a vessel of 3 mm radius, a junction or a lymph node stays near -250 HU."""
    from scipy import ndimage

    inside = np.asarray(lung) > 0
    lung_only = np.where(inside, image, -1000).astype(np.float32)
    sigma_zyx = [float(sigma_mm) / float(s) for s in tuple(spacing_xyz)[::-1]]
    smooth = ndimage.gaussian_filter(lung_only, sigma_zyx, mode="constant", cval=-1000.0, truncate=3.0)
    return inside & (np.asarray(image) > min_hu) & (smooth > min_hu)


def positive_centres(nodule: np.ndarray, rng: np.random.Generator, n: int, patch_size: int,
                     jitter_fraction: float) -> np.ndarray:
    """``n`` positive centres (z, y, x): a nodule id uniformly, one of its voxels uniformly, then a
    uniform in-plane jitter of at most ``jitter_fraction * patch_size / 2`` px (capped so that the
    voxel stays inside the patch), clamped to the volume. Empty when there is no nodule voxel."""
    if n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    zs = np.flatnonzero(nodule.reshape(nodule.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    sub = nodule[zs]  # the slices that show a nodule; flat order as in the whole volume
    flat = np.flatnonzero(sub)
    labels = sub.ravel()[flat]
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # voxels grouped by nodule, flat order inside
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    which = rng.integers(len(ids), size=n)
    voxel = flat[order[starts[which] + rng.integers(0, counts[which])]]
    centres = np.stack(np.unravel_index(voxel, sub.shape), axis=1).astype(np.int64)
    centres[:, 0] = zs[centres[:, 0]]
    max_jitter = min(int(jitter_fraction * patch_size / 2), patch_size - 1 - patch_size // 2)
    if max_jitter > 0:
        centres[:, 1:] += rng.integers(-max_jitter, max_jitter + 1, size=(n, 2))
    centres[:, 1] = np.clip(centres[:, 1], 0, nodule.shape[1] - 1)
    centres[:, 2] = np.clip(centres[:, 2], 0, nodule.shape[2] - 1)
    return centres


def window_bounds(centre: np.ndarray | int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last pixel of the patch window along one axis: ``[c - p//2, c - p//2 + p)``."""
    start = np.asarray(centre) - patch_size // 2
    return start, start + patch_size


def nodule_windows(nodule: np.ndarray, patch_size: int) -> dict[int, np.ndarray]:
    """For each slice z that shows a nodule: bool (y, x), True where a patch centred on that pixel
    would contain a nodule pixel of the slice (separable running sums along y, then x). Other
    slices block nothing."""
    blocked: dict[int, np.ndarray] = {}
    per_slice = nodule.reshape(nodule.shape[0], -1).any(axis=1)
    _, h, w = nodule.shape
    y0, y1 = (np.clip(b, 0, h) for b in window_bounds(np.arange(h), patch_size))
    x0, x1 = (np.clip(b, 0, w) for b in window_bounds(np.arange(w), patch_size))
    for z in np.flatnonzero(per_slice):
        run = np.zeros((h + 1, w), dtype=np.int32)
        np.cumsum(nodule[z] > 0, axis=0, dtype=np.int32, out=run[1:])
        rows = (run[y1] - run[y0]) > 0  # any nodule pixel in the window's rows, per column
        run = np.zeros((h, w + 1), dtype=np.int32)
        np.cumsum(rows, axis=1, dtype=np.int32, out=run[:, 1:])
        blocked[int(z)] = (run[:, x1] - run[:, x0]) > 0
    return blocked


def _draw(candidates: np.ndarray, n: int, rng: np.random.Generator, replace: bool) -> np.ndarray:
    """Up to ``n`` voxels (z, y, x) drawn uniformly from the True voxels of ``candidates``: without
    replacement (all of them if fewer), or with replacement only when there are fewer than ``n``.
    Memory-light: picks ranks, then finds each rank's slice and position."""
    if n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    per_slice = np.count_nonzero(candidates.reshape(candidates.shape[0], -1), axis=1)
    total = int(per_slice.sum())
    if total == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if total >= n:
        ranks = np.sort(rng.choice(total, size=n, replace=False))
    elif replace:
        ranks = np.sort(rng.integers(0, total, size=n))
    else:
        ranks = np.arange(total)
    ends = np.cumsum(per_slice)
    zs = np.searchsorted(ends, ranks, side="right")
    out = np.empty((len(ranks), 3), dtype=np.int64)
    for z in np.unique(zs):
        rows = np.flatnonzero(zs == z)
        flat = np.flatnonzero(candidates[z])[ranks[rows] - (ends[z] - per_slice[z])]
        out[rows, 0] = z
        out[rows, 1], out[rows, 2] = np.unravel_index(flat, candidates.shape[1:])
    return out


def cut_patches(image: np.ndarray, lung: np.ndarray, nodule: np.ndarray, centres: np.ndarray, patch_size: int,
                context: int, lung_roi: bool, context_step: int,
                visible: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``image`` int16 (k, c, p, p) (ROI applied per channel when ``lung_roi``), ``mask`` and ``roi``
    uint8 (k, p, p) of the centre slice, for centres (k, 3) (z, y, x). Outside the volume: -1000 HU
    and 0; channels are slices ``z + j * context_step``, ``j = -context .. context``, clamped to the
    volume. ``visible``: the region (same shape as ``image``) the image is kept in with
    ``lung_roi`` (:func:`noduleflow.intensity.visible_region`); None = the lung mask. ``roi`` is
    the lung mask of the centre slice either way."""
    k, p, c = len(centres), patch_size, 2 * context + 1
    depth, h, w = image.shape
    img = np.full((k, c, p, p), AIR_HU, dtype=np.int16)
    lng = np.zeros((k, c, p, p), dtype=np.uint8)
    seen = lng if visible is None else np.zeros((k, c, p, p), dtype=np.uint8)
    nod = np.zeros((k, p, p), dtype=np.uint8)
    offsets = context_offsets(context, context_step)
    for i, (z, y, x) in enumerate(centres):
        zs = np.clip(z + offsets, 0, depth - 1)
        (ya, yb), (xa, xb) = window_bounds(y, p), window_bounds(x, p)
        y0, y1, x0, x1 = max(ya, 0), min(yb, h), max(xa, 0), min(xb, w)
        if y1 <= y0 or x1 <= x0:
            continue
        dst = (slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa))
        img[i, :, dst[0], dst[1]] = image[zs, y0:y1, x0:x1]
        lng[i, :, dst[0], dst[1]] = lung[zs, y0:y1, x0:x1] > 0
        if visible is not None:
            seen[i, :, dst[0], dst[1]] = visible[zs, y0:y1, x0:x1] > 0
        nod[i, dst[0], dst[1]] = nodule[z, y0:y1, x0:x1] > 0
    if lung_roi:
        img = apply_roi(img, seen)
        roi = lng[:, context].copy()
    else:
        roi = np.ones((k, p, p), dtype=np.uint8)
    return {"image": img, "mask": nod, "roi": roi}


# --------------------------------------------------------------------------- reading


def load_patches(path: str | Path, uids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All patches of ``patches.h5`` in memory (or only those of the scans ``uids``; uids without
    patches are ignored): ``image`` int16 (n, c, h, w), ``mask``/``roi`` uint8 (n, h, w),
    ``seriesuid``/``kind`` str arrays, ``z``/``y``/``x`` int centre voxels; file order."""
    path = Path(path)
    with open_h5(path) as store:
        missing = [n for n in PATCH_DATASETS + TABLE_DATASETS if n not in store]
        if missing:
            raise InputError(f"{path}: not a patches file (missing {', '.join(missing)})")
        seriesuid = store["seriesuid"][()].astype(str)
        per_patch = PATCH_DATASETS + tuple(name for name in TABLE_DATASETS if name != "seriesuid")
        if uids is None:
            out = {name: store[name][()] for name in per_patch}
        else:
            keep = np.flatnonzero(np.isin(seriesuid, np.asarray(list(uids), dtype=str)))
            runs = index_runs(keep)
            out = {}
            for name in per_patch:
                dset = store[name]
                parts = [dset[a:b] for a, b in runs]
                out[name] = np.concatenate(parts) if parts else np.zeros((0,) + dset.shape[1:], dset.dtype)
            seriesuid = seriesuid[keep]
    out["seriesuid"] = seriesuid
    out["kind"] = out["kind"].astype(str)
    out["plane"] = out["plane"].astype(str)
    return out


def index_runs(index: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices -> [(start, stop)] of their contiguous runs."""
    if len(index) == 0:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts = np.concatenate([[index[0]], index[breaks + 1]])
    stops = np.concatenate([index[breaks] + 1, [index[-1] + 1]])
    return list(zip(starts.tolist(), stops.tolist()))
