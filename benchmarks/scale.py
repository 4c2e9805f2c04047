"""How the pipeline's cost grows with the cohort (not part of the test suite).

For each N in ``--sizes`` (default 20, 60, 120) the workflow runs in its own folder on the first N
scans of one synthetic cohort of max(N) scans with a small matrix (``--matrix`` in-plane voxels,
default 128: the same anatomy at coarser pixels, so a run takes minutes) up to fold 0's
evaluation: the patch plan and per-scan sampling, the folds, fold 0's training (``--epochs``),
prediction on its held-out scans and its evaluation. The per-scan preprocessing (synthesize,
resample, lung_mask, extract_slices) runs once, in the largest run; the smaller runs link to its
files (a per-scan job's cost does not depend on N, only the number of jobs does). Snakemake's
benchmark files give each job's wall and CPU seconds and peak resident memory (``max_rss``); the
table shows per stage and N: the number of jobs, the summed job CPU seconds (``cpu_time``: unlike
wall seconds, it does not grow when other work shares the cores), the largest job's peak RSS
(MiB), and the disk written per scan by the per-scan stages (MiB).

The line that matters for LUNA16: training reads its patches batch by batch
(:class:`noduleflow.patchdata.PatchFile`), so its peak RSS must not grow with N (the ratio
train RSS(N max) / train RSS(N min) is printed; the issue asks for <= 1.2). Per-scan stages grow
by jobs, not by job size. README "Scaling to LUNA16" extrapolates from this table and from the
full-size per-scan figures of LIDC-IDRI-0001 (docs/real-data.md).

Usage::

    .venv/bin/python benchmarks/scale.py [--sizes 20 60 120] [--cores 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from _workflow import run_snakemake, workflow_copy

#: what the per-scan stages write, per scan
PER_SCAN_DIRS = ("resampled", "lungmask", "slices", "patches/scans")


#: per-scan outputs the smaller runs take from the largest one
SHARED = ("resources", "results/resampled", "results/lungmask", "results/slices")


def run_cohort(workdir: Path, uids: list[str] | None, n_total: int, matrix: int, epochs: int, cores: int) -> float:
    """Run the pipeline on the synthetic cohort of ``n_total`` scans (restricted to ``uids`` when
    given) up to fold 0's metrics; wall seconds."""
    overrides = {"synthetic": {"n_scans": n_total, "matrix_size": matrix},
                 "train": {"epochs": epochs, "device": "cpu"}, "evaluate": {"bootstrap": 20}}
    if uids is not None:
        (workdir / "uids.txt").write_text("\n".join(uids) + "\n", encoding="utf-8")
        overrides["dataset"] = {"seriesuids": "uids.txt"}
    return run_snakemake(workdir, ["results/reports/fold0/metrics.json"], overrides, cores, "scale.yaml")


def share_preprocessing(source: Path, dest: Path) -> None:
    """Link the per-scan preprocessing files of the largest run into ``dest`` (same cohort, same
    settings: Snakemake finds them complete and does not redo them)."""
    for name in SHARED:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / name, target, copy_function=os.link, dirs_exist_ok=True)
    bench = source / "results" / "benchmarks"
    for stage in ("synthesize", "resample", "lung_mask", "extract_slices"):
        shutil.copytree(bench / stage, dest / "results" / "benchmarks" / stage, copy_function=os.link,
                        dirs_exist_ok=True)


def stage_costs(workdir: Path, n_scans: int) -> pd.DataFrame:
    """One row per stage: jobs, summed seconds and CPU seconds, largest peak RSS (MiB), from the
    benchmark files (for a run that shares the largest run's preprocessing: the first ``n_scans``
    of those, in seriesuid order)."""
    rows = []
    root = workdir / "results" / "benchmarks"
    uids = {p.name.removesuffix(".h5") for p in (workdir / "results" / "slices").glob("*.h5")}
    wanted = set(sorted(uids)[:n_scans])
    for tsv in root.rglob("*.tsv"):
        parts = tsv.relative_to(root).parts
        stage = parts[0].removesuffix(".tsv")
        if len(parts) > 1 and tsv.stem in uids and tsv.stem not in wanted:
            continue
        table = pd.read_csv(tsv, sep="\t")
        number = lambda column: float(pd.to_numeric(table[column], errors="coerce").fillna(0).iloc[0])  # noqa: E731
        rows.append({"stage": stage, "seconds": number("s"), "cpu_seconds": number("cpu_time"),
                     "max_rss_mib": number("max_rss")})
    frame = pd.DataFrame(rows)
    return frame.groupby("stage").agg(jobs=("seconds", "size"), seconds=("seconds", "sum"),
                                      cpu_seconds=("cpu_seconds", "sum"), max_rss_mib=("max_rss_mib", "max"))


def uid_of(file_name: str) -> str:
    """The seriesuid a per-scan file belongs to ({uid}.mha, {uid}_nodules.mha, {uid}.h5)."""
    stem = file_name.removesuffix(".mha").removesuffix(".h5")
    return stem.removesuffix("_nodules")


def disk_per_scan(workdir: Path, n_scans: int) -> dict[str, float]:
    """MiB per scan in each per-scan output folder (files of this run's scans only)."""
    uids = set(sorted(p.name.removesuffix(".h5") for p in (workdir / "results" / "slices").glob("*.h5"))[:n_scans])
    out = {}
    for name in PER_SCAN_DIRS:
        folder = workdir / "results" / name
        files = [p for p in folder.glob("*") if p.is_file() and uid_of(p.name) in uids] if folder.is_dir() else []
        out[name] = sum(p.stat().st_size for p in files) / 2 ** 20 / n_scans
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 60, 120])
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs under this folder")
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="noduleflow-scale-"))
    costs, disks, walls = {}, {}, {}
    n_total = max(args.sizes)
    try:
        largest = workflow_copy(base / f"n{n_total}")
        walls[n_total] = run_cohort(largest, None, n_total, args.matrix, args.epochs, args.cores)
        uids = sorted(p.name.removesuffix(".h5") for p in (largest / "results" / "slices").glob("*.h5"))
        for n in sorted(set(args.sizes) - {n_total}):
            workdir = workflow_copy(base / f"n{n}")
            share_preprocessing(largest, workdir)
            walls[n] = run_cohort(workdir, uids[:n], n_total, args.matrix, args.epochs, args.cores)
        for n in args.sizes:
            workdir = base / f"n{n}"
            costs[n], disks[n] = stage_costs(workdir, n), disk_per_scan(workdir, n)
            print(f"N = {n}: {walls[n]:.0f} s wall", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)

    stages = [s for s in ("synthesize", "resample", "lung_mask", "extract_slices", "split_folds", "plan_patches",
                          "sample_patches", "train", "predict", "evaluate") if any(s in c.index for c in costs.values())]
    print(f"\n{args.matrix}x{args.matrix} synthetic scans, fold 0 of 5, {args.epochs} epoch(s), "
          f"--cores {args.cores}\n")
    header = "| stage | " + " | ".join(f"N={n}: jobs, CPU s, RSS MiB" for n in args.sizes) + " |"
    print(header)
    print("|" + "---|" * (len(args.sizes) + 1))
    for stage in stages:
        cells = []
        for n in args.sizes:
            row = costs[n].loc[stage] if stage in costs[n].index else None
            cells.append("-" if row is None else
                         f"{int(row['jobs'])}, {row['cpu_seconds']:.0f}, {row['max_rss_mib']:.0f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print("| wall (whole run) | " + " | ".join(f"{walls[n]:.0f} s" for n in args.sizes) + " |")
    print("\ndisk per scan (MiB): " + "; ".join(
        f"N={n}: " + ", ".join(f"{k} {v:.2f}" for k, v in disks[n].items()) for n in args.sizes))
    small, large = min(args.sizes), max(args.sizes)
    train_rss = [costs[n].loc["train", "max_rss_mib"] for n in (small, large)]
    print(f"\ntrain peak RSS: {train_rss[0]:.0f} MiB at N={small}, {train_rss[1]:.0f} MiB at N={large}: "
          f"ratio {train_rss[1] / train_rss[0]:.2f} (must stay <= 1.2)")


if __name__ == "__main__":
    main()
