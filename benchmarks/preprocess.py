"""Preprocessing speed on one full-size scan (not part of the test suite).

Per stage, seconds (median of ``--repeats`` runs) for a full-size chest CT (512 x 512, ~300 mm
tall, 2.5 mm slices): ``resample`` (read + validate + resample image and labels + write),
``lung_mask`` (read + segment + write), ``extract_slices`` (read 3 images + write the HDF5 store),
and their sum against the budget of 10 s per scan on 2 cores. Side by side: the image resampling
alone with SimpleITK (linear, what ``resample`` uses) and with ``scipy.ndimage.zoom`` (order 1) to
the same output shape, with their ratio; and the slice store written with gzip-1+shuffle (the
default) and with lzf (seconds and MB).

The scan is the first scan of the synthetic cohort with ``full_size: true`` (``--seed``; its
slice thickness is drawn from the LIDC mix, so ``--thickness 2.5`` searches the cohort for a scan
with 2.5 mm slices), or the analytic phantom of ``tests/phantom.py`` when ``noduleflow.synthetic``
is not available. The lung mask's Dice against the true lungs is printed too.

Usage::

    .venv/bin/python benchmarks/preprocess.py [--repeats 3] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 10.0


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _pick_uid(seed: int, thickness_mm: float | None) -> str:
    """The first uid of the full-size cohort ``seed`` whose slices are ``thickness_mm`` thick."""
    from noduleflow.synthetic import cohort_uids, plan_scan, validate_config

    cfg = validate_config({"seed": seed, "full_size": True})
    uids = cohort_uids(60, seed)
    if thickness_mm is None:
        return uids[0]
    for index, uid in enumerate(uids):
        if abs(plan_scan(index, cfg, uid=uid).slice_thickness - thickness_mm) < 1e-6:
            return uid
    raise SystemExit(f"no scan with {thickness_mm} mm slices among the first {len(uids)} of seed {seed}")


def full_size_scan(folder: Path, seed: int = 20210521, thickness_mm: float | None = 2.5) -> dict:
    """Write one full-size scan (.mhd/.raw), its annotations CSV, exact mask and true lung mask;
    return their paths, the uid and where the scan came from."""
    try:
        from noduleflow.synthetic import synthesize_scan
    except ImportError:
        synthesize_scan = None
    if synthesize_scan is not None:
        uid = _pick_uid(seed, thickness_mm)
        paths = {"scan": folder / "subset0" / f"{uid}.mhd", "mask": folder / "masks" / f"{uid}.mha",
                 "lungs": folder / "lungs" / f"{uid}.mha", "annotations": folder / "nodules" / f"{uid}.csv"}
        synthesize_scan(uid, {"seed": seed, "full_size": True}, paths["scan"], paths["mask"], paths["lungs"],
                        paths["annotations"])
        return {"uid": uid, **paths, "source": "noduleflow.synthetic (full_size: true)"}
    sys.path.insert(0, str(REPO / "tests"))
    from phantom import make_phantom, write_phantom

    phantom = make_phantom(shape_zyx=(120, 512, 512), spacing_xyz=(0.7, 0.7, 2.5),
                           origin_xyz=(-179.3, -195.6, -352.5), uid="1.2.3.full", z_supersample=1)
    paths = write_phantom(phantom, folder)
    return {"uid": phantom.uid, "scan": paths["scan"], "annotations": paths["annotations"],
            "mask": paths["mask"], "lungs": paths["lung"], "source": "tests/phantom.py (analytic phantom)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK / BLAS threads (the budget is for 2)")
    parser.add_argument("--keep", type=Path, default=None, help="write the files here instead of a temp folder")
    parser.add_argument("--seed", type=int, default=20210521, help="synthetic cohort seed")
    parser.add_argument("--thickness", type=float, default=2.5, help="slice thickness (mm) of the scan to use")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from noduleflow.io import read_image, read_scan
    from noduleflow.lungmask import lung_mask_file
    from noduleflow.preprocess import resample_image, resample_labels, resample_scan, target_geometry
    from noduleflow.slices import extract_slices

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        scan = full_size_scan(root / "data", args.seed, args.thickness)
        made = time.perf_counter() - start
        image, geometry = read_scan(scan["scan"])
        print(f"scan: {scan['source']}, {image.shape[2]}x{image.shape[1]}x{image.shape[0]} voxels of "
              f"{'x'.join(f'{s:g}' for s in geometry.spacing)} mm ({image.shape[0] * geometry.spacing[2]:.0f} mm "
              f"tall), made in {made:.1f} s; {args.threads} threads, median of {args.repeats}; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work inflates every number)")

        cfg = {"spacing_mm": [1.0, 1.0, 1.0], "sphere_min_hu": None}
        out = root / "results"
        rows = []
        t_res, _ = _timed(lambda: resample_scan(scan["scan"], scan["annotations"], scan["uid"],
                                                out / "resampled" / "s.mha", out / "resampled" / "s_nodules.mha",
                                                mask_path=scan["mask"], **cfg), args.repeats)
        t_lung, _ = _timed(lambda: lung_mask_file(out / "resampled" / "s.mha", out / "lungmask" / "s.mha"),
                           args.repeats)
        t_slices, _ = _timed(lambda: extract_slices(out / "resampled" / "s.mha", out / "lungmask" / "s.mha",
                                                    out / "resampled" / "s_nodules.mha", scan["uid"],
                                                    out / "slices" / "s.h5"), args.repeats)
        gzip_mb = (out / "slices" / "s.h5").stat().st_size / 1e6
        t_lzf, _ = _timed(lambda: extract_slices(out / "resampled" / "s.mha", out / "lungmask" / "s.mha",
                                                 out / "resampled" / "s_nodules.mha", scan["uid"],
                                                 out / "slices" / "lzf.h5", compression={"compression": "lzf"}),
                          args.repeats)
        lzf_mb = (out / "slices" / "lzf.h5").stat().st_size / 1e6
        resampled, new_geometry = read_image(out / "resampled" / "s.mha")
        lung = read_image(out / "lungmask" / "s.mha")[0] > 0
        truth = resample_labels(read_image(scan["lungs"])[0], geometry, resampled.shape, new_geometry, 1) > 0
        nodules = read_image(out / "resampled" / "s_nodules.mha")[0]
        lung_dice = 2.0 * np.count_nonzero(lung & truth) / (np.count_nonzero(lung) + np.count_nonzero(truth))
        inside = [float(np.mean(lung[nodules == k])) for k in range(1, int(nodules.max()) + 1)]
        total = t_res + t_lung + t_slices
        rows += [("resample (read, check, image + labels, write)", t_res),
                 ("lung_mask (read, segment, write)", t_lung),
                 (f"extract_slices (gzip-1 + shuffle, {gzip_mb:.0f} MB)", t_slices),
                 ("total per scan", total)]

        shape, _ = target_geometry(image.shape, geometry, cfg["spacing_mm"])
        zoom = [n / o for n, o in zip(shape, image.shape)]
        t_sitk, _ = _timed(lambda: resample_image(image, geometry, cfg["spacing_mm"]), args.repeats)
        t_zoom, zoomed = _timed(lambda: ndi.zoom(image, zoom, order=1, mode="nearest"), args.repeats)
        assert zoomed.shape == shape

        print()
        print(f"| stage ({resampled.shape[2]}x{resampled.shape[1]}x{resampled.shape[0]} at 1 mm) | seconds |")
        print("|---|---:|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} |")
        print(f"\nbudget {BUDGET_S:.0f} s per full-size scan: {'met' if total <= BUDGET_S else 'MISSED'} "
              f"({total:.2f} s); lung mask Dice vs the true lungs {lung_dice:.4f}, nodule voxels inside "
              f"the mask: {', '.join(f'{v:.1%}' for v in inside) or 'no nodules'}\n")
        print("| image resampling to 1 mm, same output shape | seconds |")
        print("|---|---:|")
        print(f"| SimpleITK ResampleImageFilter, linear (ours) | {t_sitk:.2f} |")
        print(f"| scipy.ndimage.zoom, order 1 | {t_zoom:.2f} |")
        print(f"| ratio scipy / SimpleITK | {t_zoom / t_sitk:.1f}x |")
        print("\n| slice store compression | seconds | MB |")
        print("|---|---:|---:|")
        print(f"| gzip level 1 + shuffle (default) | {t_slices:.2f} | {gzip_mb:.0f} |")
        print(f"| lzf | {t_lzf:.2f} | {lzf_mb:.0f} |")
        return 0 if total <= BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
