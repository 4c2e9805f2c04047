"""The second stage (``second_stage.enabled``) measured on finished runs (not part of the test suite).

For every run (a folder ``benchmarks/quality.py --keep DIR`` left, made with the second stage off),
this runs the workflow's own second-stage steps with the same settings and seeds the rules use:
:func:`noduleflow.second_stage.write_fold_crops` for every fold, then
:func:`noduleflow.second_stage.rescore_fold` for every fold (its classifier fitted on the other
folds' crops). The outputs go to ``--out`` (default: ``second_stage/`` inside each run), so the runs'
own files are not touched. The figures are what the report stage would print for the run with the
second stage on: pooled CPM with its bootstrap 95 % CI (``evaluate.bootstrap`` draws, seed
``evaluate.seed``), the seven sensitivities, and the sensitivity at 8 FPs per scan per size bin;
side by side with the detector's candidates of the same run. Per-nodule Dice is the run's own
(re-scoring changes probabilities of candidates, not the segmentation).

Usage::

    .venv/bin/python benchmarks/second_stage.py RUN_DIR [RUN_DIR ...] [--set key=value ...]
        [--threads 2] [--csv table.csv]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from _workflow import REPO
from quality import SIZE_BINS_MM, cohort_truth, fmt, parse_setting, pooled_over_cohorts, subgroup_sensitivities

sys.path.insert(0, str(REPO / "src"))
from noduleflow.froc import FPS_POINTS, compute_froc  # noqa: E402
from noduleflow.second_stage import check_settings, rescore_fold, write_fold_crops  # noqa: E402

SENS = [f"sens_{p:g}" for p in FPS_POINTS]


def run_settings(run: Path) -> dict:
    """The run's config (config.yaml + quality.yaml overrides): the cohort and evaluate blocks."""
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    extra = run / "quality.yaml"
    if extra.is_file():
        for key, value in (yaml.safe_load(extra.read_text(encoding="utf-8")) or {}).items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def second_stage(run: Path, out: Path, settings: dict, threads: int) -> tuple[dict[int, Path], dict[str, float]]:
    """Both steps for every fold of ``run``; fold -> re-scored candidates, and seconds per step."""
    results = run / "results"
    folds = sorted(pd.read_csv(results / "folds.csv")["fold"].unique())
    stores = sorted((results / "slices").glob("*.h5"))
    annotations = run / "resources" / "synthetic" / "annotations.csv"
    seconds = {"crops": 0.0, "rescore": 0.0}
    crops = {}
    for k in folds:
        started = time.perf_counter()
        crops[k] = out / f"fold{k}" / "crops.h5"
        crops[k].parent.mkdir(parents=True, exist_ok=True)
        write_fold_crops(results / "predictions" / f"fold{k}" / "candidates.csv",
                         results / "predictions" / f"fold{k}" / "probabilities", results / "folds.csv", int(k), stores,
                         annotations, crops[k], variants=settings["variants"], crop_voxels=settings["crop_voxels"],
                         seed=settings["seed"])
        seconds["crops"] += time.perf_counter() - started
    rescored = {}
    for k in folds:
        started = time.perf_counter()
        rescored[k] = out / f"fold{k}" / "candidates.csv"
        rescore_fold(list(crops.values()), int(k), results / "predictions" / f"fold{k}" / "candidates.csv",
                     rescored[k], out / f"fold{k}" / "classifier.pt", settings, threads=threads)
        seconds["rescore"] += time.perf_counter() - started
    return rescored, seconds


def figures(run: Path, candidate_files: list[Path], config: dict) -> dict:
    """Pooled CPM [CI] and sensitivities of these candidates against the run's annotations (as the
    report), and the subgroup sensitivities at 8 FPs/scan (as benchmarks/quality.py)."""
    results = run / "results"
    uids = pd.read_csv(results / "folds.csv", dtype={"seriesuid": str})["seriesuid"].tolist()
    truth = pd.read_csv(run / "resources" / "synthetic" / "annotations.csv", dtype={"seriesuid": str})
    truth = truth[truth["seriesuid"].isin(uids)].reset_index(drop=True)
    candidates = pd.concat([pd.read_csv(p, dtype={"seriesuid": str}) for p in candidate_files], ignore_index=True)
    ev = config.get("evaluate", {})
    froc = compute_froc(truth, candidates, uids, bootstrap=int(ev.get("bootstrap", 1000)), seed=int(ev.get("seed", 0)))
    return {"cpm": froc.cpm, "cpm_ci_low": froc.cpm_ci[0], "cpm_ci_high": froc.cpm_ci[1],
            **dict(zip(SENS, froc.sensitivities)), "n_nodules": len(truth),
            **subgroup_sensitivities(cohort_truth(run, uids), candidates, uids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--set", dest="settings", type=parse_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="a second_stage setting (e.g. epochs=30); repeatable")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the outputs (one subfolder per run); default RUN/second_stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    overrides = {".".join(k).removeprefix("second_stage."): v for k, v in args.settings}
    settings = check_settings({**overrides, "enabled": True})

    rows = []
    for run in args.runs:
        config = run_settings(run)
        out = (args.out / run.name) if args.out else run / "second_stage"
        rescored, seconds = second_stage(run, out, settings, args.threads)
        detector = sorted((run / "results" / "predictions").glob("fold*/candidates.csv"))
        summary = pd.read_csv(run / "results" / "reports" / "summary.csv", dtype={"fold": str}).set_index("fold")
        base = {"run": run.name, "scans": int(config["synthetic"]["n_scans"]), "folds": int(config["cv"]["folds"]),
                "dice_per_nodule": float(summary.loc["pooled", "dice_per_nodule"]),
                "seconds_crops": round(seconds["crops"], 1), "seconds_rescore": round(seconds["rescore"], 1)}
        for stage, files in (("detector", detector), ("second_stage", list(rescored.values()))):
            rows.append({**base, "candidates": stage, **figures(run, files, config)})
        print(f"{run.name}: CPM {fmt(rows[-2]['cpm'])} -> {fmt(rows[-1]['cpm'])} "
              f"(crops {seconds['crops']:.0f} s, rescore {seconds['rescore']:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    print(f"\nsecond_stage: {settings}\n")
    for (scans, folds), regime in table.groupby(["scans", "folds"], sort=False):
        print(f"### {scans} scans / {folds} folds\n")
        head = ["run", "candidates", "CPM [95 % CI]", *[f"sens@{p:g}" for p in FPS_POINTS], "Dice/nodule",
                "6-10 mm sens@8", "s crops + rescore"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for _, r in regime.iterrows():
            print(f"| {r['run']} | {r['candidates']} | {fmt(r['cpm'])} [{fmt(r['cpm_ci_low'], 2)}, "
                  f"{fmt(r['cpm_ci_high'], 2)}] | " + " | ".join(fmt(r[c]) for c in SENS)
                  + f" | {fmt(r['dice_per_nodule'])} | {fmt(r['sens8_size_6-10'])} | "
                  f"{r['seconds_crops']:.0f} + {r['seconds_rescore']:.0f} |")
        print()
        for stage, part in regime.groupby("candidates", sort=False):
            cpm = part["cpm"].to_numpy()
            sizes = []
            for _, _, name in SIZE_BINS_MM:
                pooled, n = pooled_over_cohorts(part, "size", name)
                sizes.append(f"{name} mm {fmt(pooled)} (n={n})")
            print(f"- {stage}: CPM {fmt(cpm.mean())} ± {fmt(cpm.std(ddof=1) if len(cpm) > 1 else 0.0)}, worst "
                  f"{fmt(cpm.min())}; sens@8 pooled by size: " + ", ".join(sizes))
        print()
    if args.csv is not None:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
