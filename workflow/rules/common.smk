# Scan discovery, runs (base + experiments), and the input functions of every rule.
import re
from pathlib import Path

from noduleflow.io import InputError, discover_scans, read_annotations, read_uid_list
from noduleflow.runconfig import (
    BASE_PREFIX,
    canonical,
    check_config,
    code_digest,
    run_configs,
    stage_owner,
    stage_params,
)
from noduleflow.synthetic import cohort_uids

check_config(config)
RUNS = run_configs(config)
for _prefix, _run in RUNS.items():
    if _prefix != BASE_PREFIX:
        validate(_run, "../schemas/config.schema.yaml", set_default=True)
        check_config(_run, where=f"experiment {_prefix}")

SYNTHETIC = config["dataset"]["root"] is None
DATA_ROOT = Path(config["synthetic"]["output"] if SYNTHETIC else config["dataset"]["root"])
ANNOTATIONS = str(DATA_ROOT / config["dataset"]["annotations"])
_excluded = DATA_ROOT / config["dataset"]["excluded"]
EXCLUDED = str(_excluded) if (not SYNTHETIC and _excluded.is_file()) else None
# strata of the folds: the synthetic cohort writes its own (rule synthesize_annotations); on real data
# the file is used when it exists, like annotations_excluded.csv
_strata = DATA_ROOT / config["dataset"]["strata"] if config["dataset"]["strata"] else None
STRATA = str(_strata) if _strata is not None and (SYNTHETIC or _strata.is_file()) else None


def _discover():
    """seriesuid -> .mhd path, restricted to dataset.seriesuids when given."""
    if SYNTHETIC:
        syn = config["synthetic"]
        found = {u: str(DATA_ROOT / "subset0" / f"{u}.mhd") for u in cohort_uids(syn["n_scans"], syn["seed"])}
    else:
        found = {u: str(p) for u, p in discover_scans(DATA_ROOT).items()}
        if not found:
            raise InputError(f"{DATA_ROOT}: no scans found (expected subset*/*.mhd or *.mhd)")
    wanted = read_uid_list(config["dataset"]["seriesuids"])
    if wanted is not None:
        unknown = [u for u in wanted if u not in found]
        if unknown:
            raise InputError(
                f"dataset.seriesuids: {len(unknown)} seriesuid(s) have no scan under {DATA_ROOT}, e.g. {unknown[0]}"
            )
        found = {u: found[u] for u in wanted}
    return found


SCANS = _discover()
UIDS = sorted(SCANS)


def _annotation_rows():
    """Real data: seriesuid -> its annotation rows (read at parse time and passed as params, so a
    new scan's rows do not rerun the other scans). Synthetic data: empty (per-scan files instead)."""
    if SYNTHETIC:
        return {}
    table = read_annotations(ANNOTATIONS)
    all_scans = set(discover_scans(DATA_ROOT))
    orphans = sorted(set(table["seriesuid"]) - all_scans)
    if orphans:
        raise InputError(
            f"{ANNOTATIONS}: {len(orphans)} annotation(s) name a seriesuid with no scan "
            f"under {DATA_ROOT}, e.g. {orphans[0]}"
        )
    rows = {}
    for uid, group in table.groupby("seriesuid", sort=False):
        rows[uid] = group[["coordX", "coordY", "coordZ", "diameter_mm"]].round(6).values.tolist()
    return rows


ANNOTATION_ROWS = _annotation_rows()


wildcard_constraints:
    prefix="results/(experiments/[A-Za-z0-9_-]+/)?",
    uid="|".join(re.escape(u) for u in UIDS),
    k=r"\d+",


# ------------------------------------------------------------------ runs and stage ownership


def cfg(prefix):
    """Full configuration of the run whose files live under ``prefix``."""
    return RUNS[prefix]


def params_of(stage):
    """A params function: the narrow config block ``stage`` reads, for the requested run."""
    return lambda wildcards: stage_params(RUNS[wildcards.prefix], stage)


def owner(wildcards, stage):
    """Prefix under which ``stage``'s files for this run live (shared with the base when equal)."""
    return stage_owner(RUNS, wildcards.prefix, stage)


def folds_of(prefix):
    return range(RUNS[prefix]["cv"]["folds"])


# ------------------------------------------------------------------ input functions


def scan_path(wildcards):
    return SCANS[wildcards.uid]


def raw_path(wildcards):
    return re.sub(r"\.mhd$", ".raw", SCANS[wildcards.uid])


def resample_inputs(wildcards):
    """Scan (.mhd + .raw), its annotations, and the exact label map when the data set has one."""
    uid = wildcards.uid
    inputs = {"scan": SCANS[uid], "raw": raw_path(wildcards)}
    if SYNTHETIC:
        inputs["annotations"] = str(DATA_ROOT / "nodules" / f"{uid}.csv")
        inputs["mask"] = str(DATA_ROOT / "masks" / f"{uid}.mha")
    else:
        inputs["annotations"] = ancient(ANNOTATIONS)
        if config["dataset"]["masks"]:
            mask = DATA_ROOT / config["dataset"]["masks"] / f"{uid}.mha"
            if mask.is_file():
                inputs["mask"] = str(mask)
    return inputs


def annotation_rows(wildcards):
    return ANNOTATION_ROWS.get(wildcards.uid, [])


def resampled(wildcards, kind=""):
    return f"{owner(wildcards, 'resample')}resampled/{wildcards.uid}{kind}.mha"


def slice_files(wildcards):
    """Every scan's slice store for this run."""
    return [f"{owner(wildcards, 'extract_slices')}slices/{u}.h5" for u in UIDS]


def split_inputs(wildcards):
    """annotations.csv, plus the user's split file, patient groups and strata when configured."""
    inputs = {"annotations": ANNOTATIONS}
    if STRATA:
        inputs["strata"] = STRATA
    if RUNS[wildcards.prefix]["cv"]["split_file"]:
        inputs["split_file"] = RUNS[wildcards.prefix]["cv"]["split_file"]
    if config["dataset"]["groups"]:
        inputs["groups"] = config["dataset"]["groups"]
    return inputs


def folds_file(wildcards):
    return f"{owner(wildcards, 'split_folds')}folds.csv"


def patches_file(wildcards):
    return f"{owner(wildcards, 'sample_patches')}patches/patches.h5"


def model_file(wildcards):
    return f"{owner(wildcards, 'train')}models/fold{wildcards.k}/model.pt"


def prediction_dir(wildcards):
    return f"{owner(wildcards, 'predict')}predictions/fold{wildcards.k}"


def fold_reports(wildcards):
    base = owner(wildcards, "evaluate")
    return [f"{base}reports/fold{k}/metrics.json" for k in folds_of(wildcards.prefix)]


def fold_predictions(wildcards):
    base = owner(wildcards, "predict")
    return [f"{base}predictions/fold{k}/candidates.csv" for k in folds_of(wildcards.prefix)]


def fold_probabilities(wildcards):
    base = owner(wildcards, "predict")
    return [f"{base}predictions/fold{k}/probabilities" for k in folds_of(wildcards.prefix)]


def experiment_reports(wildcards):
    """name -> summary.csv of each experiment (under the owner of its report stage), plus
    ``name__froc`` / ``name__metrics``: the pooled curve and metrics beside it."""
    out = {}
    for prefix in RUNS:
        if prefix == BASE_PREFIX:
            continue
        name = Path(prefix).name
        reports = f"{stage_owner(RUNS, prefix, 'report')}reports"
        out[name] = f"{reports}/summary.csv"
        # read beside summary.csv by the comparison: the pooled curve and the run's settings
        out[f"{name}__froc"] = f"{reports}/froc_pooled.csv"
        out[f"{name}__metrics"] = f"{reports}/metrics_pooled.json"
    return out
