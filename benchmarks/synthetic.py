"""Speed and look of the synthetic cohort (noduleflow.synthetic).

Prints seconds per scan (plan + render + writing the four files) for the default size and for
``full_size``, and writes ``benchmarks/out/synthetic_slices.png``: for a few scans, the axial slice
through a nodule (lung window, nodules outlined in red, the true lung mask in cyan), a zoom on that
nodule, the same slice in a mediastinal window, and a coronal slice.

    .venv/bin/python benchmarks/synthetic.py [--scans 4] [--full-scans 2] [--seed 20210521]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from noduleflow.io import read_annotations, read_image, read_scan, world_to_voxel
from noduleflow.synthetic import cohort_uids, plan_scan, synthesize_scan, validate_config

OUT = Path(__file__).resolve().parent / "out"


def time_scans(cfg: dict, n: int, folder: Path) -> list[dict]:
    """Make the first ``n`` scans of ``cfg``'s cohort in ``folder``; one timing row per scan."""
    rows = []
    for index, uid in enumerate(cohort_uids(n, cfg["seed"])):
        started = time.perf_counter()
        cpu = time.process_time()
        synthesize_scan(uid, cfg, folder / "subset0" / f"{uid}.mhd", folder / "masks" / f"{uid}.mha",
                        folder / "lungs" / f"{uid}.mha", folder / "nodules" / f"{uid}.csv")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        plan = plan_scan(index, cfg)
        rows.append({"uid": uid, "index": index, "full_size": cfg["full_size"], "shape": plan.shape,
                     "thickness": plan.slice_thickness, "spacing": plan.geometry.spacing[0],
                     "nodules": len(plan.nodules), "seconds": seconds, "cpu": cpu,
                     "nodule_info": [(n.diameter_mm, n.texture, n.location) for n in plan.nodules]})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'size':8} {'scan':>4} {'voxels (x*y*z)':>16} {'slice mm':>8} {'pixel mm':>8} "
          f"{'nodules':>7} {'wall s':>7} {'cpu s':>6}")
    for r in rows:
        nz, ny, nx = r["shape"]
        print(f"{'full' if r['full_size'] else 'default':8} {r['index']:>4} {f'{nx}x{ny}x{nz}':>16} "
              f"{r['thickness']:>8.2f} {r['spacing']:>8.3f} {r['nodules']:>7} {r['seconds']:>7.2f} {r['cpu']:>6.2f}")
    for size in (False, True):
        sel = [r["seconds"] for r in rows if r["full_size"] == size]
        if sel:
            print(f"{'full' if size else 'default'}: mean {np.mean(sel):.2f} s per scan, max {np.max(sel):.2f} s "
                  f"({len(sel)} scans)")


def plot(folder: Path, uids: list[str], path: Path, max_rows: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = []
    for uid in uids:
        rows = read_annotations(folder / "nodules" / f"{uid}.csv")
        if len(rows):
            chosen.append((uid, rows))
        if len(chosen) == max_rows:
            break
    if not chosen:
        chosen = [(uids[0], None)]
    fig, axes = plt.subplots(len(chosen), 4, figsize=(20, 5 * len(chosen)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    for row, (uid, nodules) in zip(axes, chosen):
        image, geometry = read_scan(folder / "subset0" / f"{uid}.mhd")
        labels, _ = read_image(folder / "masks" / f"{uid}.mha")
        lungs, _ = read_image(folder / "lungs" / f"{uid}.mha")
        if nodules is not None:
            pick = nodules.iloc[0]
            z, y, x = np.rint(world_to_voxel(pick[["coordX", "coordY", "coordZ"]].to_numpy(float), geometry)).astype(int)
            title = f"{pick['diameter_mm']:.1f} mm nodule"
        else:
            z, y, x = image.shape[0] // 2, image.shape[1] // 2, image.shape[2] // 2
            title = "no nodules"
        sx, sz = geometry.spacing[0], geometry.spacing[2]
        ax = row[0]
        ax.imshow(image[z], cmap="gray", vmin=-1350, vmax=150)
        ax.contour(labels[z] > 0, [0.5], colors="red", linewidths=0.8)
        ax.contour(lungs[z], [0.5], colors="cyan", linewidths=0.4, alpha=0.6)
        ax.set_title(f"...{uid[-6:]} z={z} ({sz:g} mm slices, {sx:.2f} mm pixels): {title}")
        half = 40
        y0, x0 = max(y - half, 0), max(x - half, 0)
        crop = image[z, y0:y + half, x0:x + half]
        row[1].imshow(crop, cmap="gray", vmin=-1350, vmax=150)
        row[1].contour(labels[z, y0:y + half, x0:x + half] > 0, [0.5], colors="red", linewidths=1.0)
        row[1].set_title("zoom, lung window [-1350, 150] HU")
        row[2].imshow(image[z], cmap="gray", vmin=-160, vmax=240)
        row[2].set_title("mediastinal window [-160, 240] HU")
        row[3].imshow(image[:, y, :], cmap="gray", vmin=-1350, vmax=150, aspect=sz / sx, origin="lower")
        row[3].contour(labels[:, y, :] > 0, [0.5], colors="red", linewidths=0.8)
        row[3].set_title(f"coronal y={y}")
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=4, help="default-size scans to time")
    parser.add_argument("--full-scans", type=int, default=2, help="full-size scans to time")
    parser.add_argument("--seed", type=int, default=20210521)
    parser.add_argument("--png", type=Path, default=OUT / "synthetic_slices.png")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        default = validate_config({"seed": args.seed, "full_size": False})
        default.pop("output")
        rows += time_scans(default, args.scans, Path(tmp) / "default")
        if args.full_scans:
            full = dict(default, full_size=True)
            rows += time_scans(full, args.full_scans, Path(tmp) / "full")
        print_table(rows)
        plot(Path(tmp) / "default", cohort_uids(args.scans, args.seed), args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
