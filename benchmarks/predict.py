"""``noduleflow predict`` speed and memory on one full-size scan (not part of the test suite).

For each configuration, ``noduleflow predict`` runs in a fresh process pinned to ``--cores`` CPU
cores (``--threads`` torch threads, ITK/OpenMP threads capped alike) on one full-size chest CT:

* the single-fold model (``--folds`` first fold found),
* the whole fold ensemble (every ``fold{k}/model.pt`` under ``--models``: 5 with ``make run``),
* the ensemble with flip test-time augmentation (``--tta``).

Printed per configuration: seconds for the scan as the command logs it (read + preprocess +
inference + writing the maps and the page), the whole process's wall time (adds Python, torch and
model loading) and CPU time (user + system: on a machine shared with other jobs, wall time grows
and CPU time much less), peak resident memory of the process (MiB), the number of candidates and, when the
scan has LUNA16 annotations, the rank and probability of the best candidate on each annotated
nodule (a hit: within the nodule's radius of its centre, as LUNA16 counts it).

The scan is LIDC-IDRI-0001 (``../shared/realct`` or $NODULEFLOW_REALCT; 512 x 512 x 133 slices,
0.70 x 0.70 x 2.5 mm) as its DICOM series folder, or ``--scan`` (any input the command reads).

Usage (after ``make run``, which writes results/models/fold{0..4}/model.pt)::

    .venv/bin/python benchmarks/predict.py [--models results/models] [--scan PATH] [--cores 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
LIDC_0001_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
BUDGET_S = 90.0


def realct_root() -> Path | None:
    for candidate in (os.environ.get("NODULEFLOW_REALCT"), REPO.parent / "shared" / "realct", "/work/shared/realct"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def default_scan() -> Path:
    root = realct_root()
    folders = sorted((root / "LIDC-IDRI-0001").glob(f"*/{LIDC_0001_UID}")) if root else []
    if not folders:
        raise SystemExit("LIDC-IDRI-0001 not found (../shared/realct or $NODULEFLOW_REALCT); pass --scan PATH")
    return folders[0]


def run_predict(models: Path, scan: Path, out: Path, cores: int, threads: int, extra: list[str]) -> dict:
    """One ``noduleflow predict`` process on ``cores`` cores: seconds, peak RSS, candidates."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    allowed = sorted(os.sched_getaffinity(0))
    pinned = set(allowed[:cores])
    command = [sys.executable, "-m", "noduleflow.cli", "predict", "--quiet", "--models", str(models),
               "--input", str(scan), "--output", str(out), "--threads", str(threads), *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.sched_setaffinity(0, pinned))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stdout}\n{stderr}")
    log = (out / "predict.log").read_text(encoding="utf-8")
    seconds = [float(m) for m in re.findall(r"candidate\(s\), top p \S+, (\d+\.\d+) s \(preprocess", log)]
    parts = re.findall(r"\(preprocess (\d+\.\d+) s, inference (\d+\.\d+) s\)", log)
    return {"seconds": seconds[0], "preprocess": float(parts[0][0]), "inference": float(parts[0][1]),
            "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024.0,
            "candidates": pd.read_csv(out / "candidates.csv", dtype={"seriesuid": str})}


def nodule_ranks(candidates: pd.DataFrame, annotations: pd.DataFrame) -> str:
    """'rank r (p 0.xx)' of the best candidate on each annotated nodule, or 'missed'."""
    if annotations.empty:
        return "–"
    out = []
    centres = candidates[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
    for _, nodule in annotations.iterrows():
        centre = nodule[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
        hits = np.flatnonzero(np.linalg.norm(centres - centre, axis=1) <= nodule["diameter_mm"] / 2.0) \
            if len(centres) else np.array([], dtype=int)
        if hits.size:
            best = int(hits[0])  # candidates are sorted by probability
            p = float(candidates["probability"].iloc[best])
            out.append(f"{nodule['diameter_mm']:.1f} mm: rank {best + 1} (p {p:.3f})")
        else:
            out.append(f"{nodule['diameter_mm']:.1f} mm: missed")
    return "; ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "results" / "models",
                        help="models folder with fold{k}/model.pt (default results/models)")
    parser.add_argument("--scan", type=Path, help="a scan file or DICOM series folder (default LIDC-IDRI-0001)")
    parser.add_argument("--annotations", type=Path,
                        help="LUNA16 annotations.csv (default realct/luna16/annotations.csv when present)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the process is pinned to")
    parser.add_argument("--threads", type=int, default=2, help="torch/ITK/OpenMP threads")
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "src"))
    from noduleflow.apply import discover_inputs, find_models
    from noduleflow.io import read_annotations
    from noduleflow.scans import read_canonical

    scan = args.scan or default_scan()
    paths = find_models(args.models)
    folds = [int(p.parent.name[len("fold"):]) for p in paths]
    (uid,) = discover_inputs([scan])
    canonical = read_canonical(scan)
    annotations = pd.DataFrame()
    table = args.annotations or ((realct_root() / "luna16" / "annotations.csv") if realct_root() else None)
    if table is not None and Path(table).is_file():
        rows = read_annotations(table)
        annotations = rows[rows["seriesuid"] == uid]
    shape = "x".join(str(n) for n in canonical.source_shape[::-1])
    spacing = "x".join(f"{s:.3g}" for s in canonical.source_geometry.spacing)
    print(f"scan {scan} ({shape} voxels at {spacing} mm), models {args.models} (folds {folds}), "
          f"{args.cores} cores, {args.threads} threads")

    configs = [(f"1 fold (fold {folds[0]})", ["--folds", str(folds[0])]),
               (f"{len(folds)}-fold ensemble", []),
               (f"{len(folds)}-fold ensemble + TTA", ["--tta"])]
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        root = args.keep or Path(tmp)
        rows = []
        for i, (name, extra) in enumerate(configs):
            result = run_predict(args.models, scan, root / f"run{i}", args.cores, args.threads, extra)
            rows.append((name, result))
            print(f"  {name}: {result['seconds']:.1f} s", flush=True)

    print()
    print("| models | s per scan | preprocess s | inference s | process wall s | process CPU s | peak RSS MiB | "
          "candidates | LUNA16 nodule(s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.1f} | {r['preprocess']:.1f} | {r['inference']:.1f} | {r['wall']:.1f} | "
              f"{r['cpu']:.1f} | {r['peak_rss_mib']:.0f} | {len(r['candidates'])} | "
              f"{nodule_ranks(r['candidates'], annotations)} |")
    ensemble = rows[1][1]["seconds"]
    verdict = "within" if ensemble <= BUDGET_S else "OVER"
    print(f"\n{len(folds)}-fold ensemble without TTA: {ensemble:.1f} s per scan, {verdict} the {BUDGET_S:.0f} s budget")


if __name__ == "__main__":
    main()
