"""How the pipeline's cost grows with the cohort (not part of the test suite).

For each N in ``--sizes`` (default 20, 60, 120) the workflow runs in its own folder on a synthetic
cohort of N scans with a small matrix (``--matrix`` in-plane voxels, default 128: the same anatomy
at coarser pixels, so a run takes minutes) up to fold 0's evaluation: every per-scan stage for every
scan, the patch plan, fold 0's training (``--epochs``), prediction on its held-out scans and its
evaluation. Snakemake's benchmark files give each job's wall seconds and peak resident memory
(``max_rss``); the table shows per stage and N: the number of jobs, the summed job CPU seconds
(``cpu_time``: unlike wall seconds, it does not grow when other work shares the cores), the
largest job's peak RSS (MiB), and the disk written per scan by the per-scan stages (MiB).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
#: what the per-scan stages write, per scan
PER_SCAN_DIRS = ("resampled", "lungmask", "slices", "patches/scans")


def workflow_copy(dest: Path) -> Path:
    """The workflow files (not results, not the venv) under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("workflow", "envs", "config"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def run_cohort(workdir: Path, n_scans: int, matrix: int, epochs: int, cores: int) -> float:
    """Run the pipeline on ``n_scans`` synthetic scans up to fold 0's metrics; wall seconds."""
    overrides = {"synthetic": {"n_scans": n_scans, "matrix_size": matrix},
                 "train": {"epochs": epochs, "device": "cpu"}, "evaluate": {"bootstrap": 20}}
    (workdir / "scale.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    started = time.perf_counter()
    # the target goes before --configfile, which takes every word after it as a config file
    done = subprocess.run([sys.executable, "-m", "snakemake", "results/reports/fold0/metrics.json", "--cores",
                           str(cores), "--configfile", "scale.yaml"], cwd=workdir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"snakemake failed for N = {n_scans}:\n{done.stdout[-3000:]}")
    return time.perf_counter() - started


def stage_costs(workdir: Path) -> pd.DataFrame:
    """One row per stage: jobs, summed seconds, largest peak RSS (MiB), from the benchmark files."""
    rows = []
    root = workdir / "results" / "benchmarks"
    for tsv in root.rglob("*.tsv"):
        stage = tsv.relative_to(root).parts[0].removesuffix(".tsv")
        table = pd.read_csv(tsv, sep="\t")
        number = lambda column: float(pd.to_numeric(table[column], errors="coerce").fillna(0).iloc[0])  # noqa: E731
        rows.append({"stage": stage, "seconds": number("s"), "cpu_seconds": number("cpu_time"),
                     "max_rss_mib": number("max_rss")})
    frame = pd.DataFrame(rows)
    return frame.groupby("stage").agg(jobs=("seconds", "size"), seconds=("seconds", "sum"),
                                      cpu_seconds=("cpu_seconds", "sum"), max_rss_mib=("max_rss_mib", "max"))


def disk_per_scan(workdir: Path, n_scans: int) -> dict[str, float]:
    """MiB per scan in each per-scan output folder."""
    out = {}
    for name in PER_SCAN_DIRS:
        folder = workdir / "results" / name
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        out[name] = size / 2 ** 20 / n_scans
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
    try:
        for n in args.sizes:
            workdir = workflow_copy(base / f"n{n}")
            walls[n] = run_cohort(workdir, n, args.matrix, args.epochs, args.cores)
            costs[n], disks[n] = stage_costs(workdir), disk_per_scan(workdir, n)
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
