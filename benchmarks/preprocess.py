"""Preprocessing speed on one full-size scan (not part of the test suite).

Per stage, seconds (median of ``--repeats`` runs) for a full-size chest CT (512 x 512, ~300 mm
tall, 2.5 mm slices): ``resample`` (read + validate + resample image and labels + write),
``lung_mask`` (read + segment + write), ``extract_slices`` (read 3 images + write the HDF5 store),
and their sum against the budget of 10 s per scan on 2 cores. Side by side: the image resampling
alone with SimpleITK (linear, what ``resample`` uses) and with ``scipy.ndimage.zoom`` (order 1) to
the same output shape, with their ratio; and the slice store written with gzip-1+shuffle (the
default) and with lzf (seconds and MB).

The scan is ``noduleflow.synthetic`` 's full-size scan when that module provides
``synthesize_scan``, else the analytic phantom of ``tests/phantom.py`` at the same size.

Usage::

    .venv/bin/python benchmarks/preprocess.py [--repeats 3] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import inspect
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


def full_size_scan(folder: Path) -> dict:
    """Write one full-size scan (.mhd/.raw), its annotations CSV and exact mask; return paths + uid."""
    try:
        from noduleflow import synthetic
        synthesize_scan = getattr(synthetic, "synthesize_scan")
    except (ImportError, AttributeError):
        synthesize_scan = None
    if synthesize_scan is not None:
        written = _synthetic_scan(synthesize_scan, folder)
        if written is not None:
            return written
    sys.path.insert(0, str(REPO / "tests"))
    from phantom import make_phantom, write_phantom

    phantom = make_phantom(shape_zyx=(120, 512, 512), spacing_xyz=(0.7, 0.7, 2.5),
                           origin_xyz=(-179.3, -195.6, -352.5), uid="1.2.3.full", z_supersample=1)
    paths = write_phantom(phantom, folder)
    return {"uid": phantom.uid, "scan": paths["scan"], "annotations": paths["annotations"],
            "mask": paths["mask"], "source": "tests/phantom.py (analytic phantom)"}


def _synthetic_scan(synthesize_scan, folder: Path) -> dict | None:
    """Call ``noduleflow.synthetic.synthesize_scan`` for one full-size scan; None when its
    signature is not understood (the benchmark then falls back to the phantom)."""
    from noduleflow.io import write_image

    params = inspect.signature(synthesize_scan).parameters
    kwargs = {}
    for name, value in (("full_size", True), ("seed", 20210521), ("index", 0), ("scan_index", 0)):
        if name in params:
            kwargs[name] = value
    try:
        scan = synthesize_scan(**kwargs)
    except TypeError as exc:
        print(f"synthesize_scan({kwargs}) failed ({exc}); using the phantom", file=sys.stderr)
        return None
    get = (lambda k: scan[k]) if isinstance(scan, dict) else (lambda k: getattr(scan, k))
    try:
        uid = str(get("uid"))
        image, geometry, labels, nodules = get("image"), get("geometry"), get("labels"), get("nodules")
    except (KeyError, AttributeError) as exc:
        print(f"synthesize_scan result not understood ({exc}); using the phantom", file=sys.stderr)
        return None
    paths = {"scan": folder / f"{uid}.mhd", "mask": folder / f"{uid}_mask.mha", "annotations": folder / "nodules.csv"}
    write_image(np.asarray(image, dtype=np.int16), geometry, paths["scan"])
    write_image(np.asarray(labels, dtype=np.uint8), geometry, paths["mask"])
    nodules.to_csv(paths["annotations"], index=False)
    return {"uid": uid, **paths, "source": "noduleflow.synthetic.synthesize_scan(full_size=True)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK / BLAS threads (the budget is for 2)")
    parser.add_argument("--keep", type=Path, default=None, help="write the files here instead of a temp folder")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from noduleflow.io import read_image, read_scan
    from noduleflow.lungmask import lung_mask_file
    from noduleflow.preprocess import resample_image, resample_scan, target_geometry
    from noduleflow.slices import extract_slices

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        scan = full_size_scan(root / "data")
        made = time.perf_counter() - start
        image, geometry = read_scan(scan["scan"])
        print(f"scan: {scan['source']}, {image.shape[2]}x{image.shape[1]}x{image.shape[0]} voxels of "
              f"{'x'.join(f'{s:g}' for s in geometry.spacing)} mm ({image.shape[0] * geometry.spacing[2]:.0f} mm "
              f"tall), made in {made:.1f} s; {args.threads} threads, median of {args.repeats}")

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
              f"({total:.2f} s)\n")
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
