# Scan discovery, runs (base + experiments), and the input functions of every rule.
import re
from pathlib import Path

from noduleflow.io import InputError, read_annotations, read_uid_list
from noduleflow.runconfig import (
    BASE_PREFIX,
    canonical,
    check_config,
    code_digest,
    run_configs,
    stage_owner,
    stage_params,
)
from noduleflow.scans import find_scans, scan_suffix
from noduleflow.synthetic import cohort_uids

check_config(config)
RUNS = run_configs(config)
for _prefix, _run in RUNS.items():
    if _prefix != BASE_PREFIX:
        validate(_run, "../schemas/config.schema.yaml", set_default=True)
        check_config(_run, where=f"experiment {_prefix}")

SYNTHETIC = config["dataset"]["root"] is None
DATA_ROOT = Path(config["synthetic"]["output"] if SYNTHETIC else config["dataset"]["root"])
# Real data: every scan under the root, any accepted format, discovered once (seriesuid -> path)
ALL_SCANS = (
    {}
    if SYNTHETIC
    else {u: str(p) for u, p in find_scans(DATA_ROOT, skip_dirs=[d for d in [config["dataset"]["masks"]] if d]).items()}
)
if not SYNTHETIC and not ALL_SCANS:
    raise InputError(
        f"{DATA_ROOT}: no scans found (expected DICOM series folders or files ending in "
        f"{', '.join(('.mhd', '.mha', '.nrrd', '.nii', '.nii.gz'))}; config dataset.root)"
    )


# seriesuid -> the LIDC readers' XML files beside its DICOM slices (DICOM scans only; globbed once)
SERIES_XML = {u: sorted(str(x) for x in Path(p).glob("*.xml")) for u, p in ALL_SCANS.items() if Path(p).is_dir()}


def _annotation_source():
    """'synthetic', 'csv' (dataset.annotations under the root) or 'lidc' (derived from the readers'
    XML). The default annotations.csv falls back to the XML when the root has no such file."""
    if SYNTHETIC:
        return "synthetic"
    name = config["dataset"]["annotations"]
    if name == "lidc_xml":
        return "lidc"
    if not (DATA_ROOT / name).is_file() and name == "annotations.csv" and any(SERIES_XML.values()):
        return "lidc"
    if not (DATA_ROOT / name).is_file():
        raise InputError(
            f"{DATA_ROOT / name}: annotations file not found (config dataset.annotations; "
            f"'lidc_xml' derives them from LIDC-IDRI readers' XML)"
        )
    return "csv"


ANNOTATION_SOURCE = _annotation_source()
LIDC_XML = SERIES_XML if ANNOTATION_SOURCE == "lidc" else {}
LIDC_OUT = "results/lidc"
if ANNOTATION_SOURCE == "lidc":
    ANNOTATIONS = f"{LIDC_OUT}/annotations.csv"
    EXCLUDED = f"{LIDC_OUT}/annotations_excluded.csv" if config["dataset"]["excluded"] else None
else:
    ANNOTATIONS = str(DATA_ROOT / config["dataset"]["annotations"])
    EXCLUDED = None
    if not SYNTHETIC and config["dataset"]["excluded"]:
        EXCLUDED = str(DATA_ROOT / config["dataset"]["excluded"])
        if not Path(EXCLUDED).is_file():
            raise InputError(
                f"{EXCLUDED}: excluded findings file not found (config dataset.excluded). "
                f"LUNA16 scores with annotations_excluded.csv; set dataset.excluded: null "
                f"to evaluate without excluded findings"
            )
# strata of the folds: the synthetic cohort writes its own (rule synthesize_annotations); on real data
# the file is used when it exists
_strata = DATA_ROOT / config["dataset"]["strata"] if config["dataset"]["strata"] else None
STRATA = str(_strata) if _strata is not None and (SYNTHETIC or _strata.is_file()) else None
if ANNOTATION_SOURCE == "lidc" and _strata is not None and not _strata.is_file():
    STRATA = f"{LIDC_OUT}/strata.csv"  # from the readers' texture ratings


def _discover():
    """seriesuid -> scan path, restricted to dataset.seriesuids when given."""
    if SYNTHETIC:
        syn = config["synthetic"]
        found = {u: str(DATA_ROOT / "subset0" / f"{u}.mhd") for u in cohort_uids(syn["n_scans"], syn["seed"])}
    else:
        found = dict(ALL_SCANS)
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
    """A CSV of the whole data set: seriesuid -> its annotation rows (read at parse time and passed
    as params, so a new scan's rows do not rerun the other scans). Synthetic and LIDC data: empty
    (per-scan files instead)."""
    if ANNOTATION_SOURCE != "csv":
        return {}
    table = read_annotations(ANNOTATIONS)
    orphans = sorted(set(table["seriesuid"]) - set(ALL_SCANS))
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


# ------------------------------------------------------------------ CPUs a job uses


def cpus_of_threads(wildcards, threads):
    """cpus_per_task (sbatch -c) of a job whose process runs ``threads`` torch/OpenMP threads."""
    return threads


def train_cpus(wildcards, threads):
    """cpus_per_task of a train job: ``threads`` torch threads in the training process plus one CPU
    per DataLoader worker process (train.num_workers of the run; each worker runs one thread)."""
    return threads + int(RUNS[wildcards.prefix]["train"]["num_workers"])


# ------------------------------------------------------------------ input functions


def scan_path(wildcards):
    return SCANS[wildcards.uid]


def resample_inputs(wildcards):
    """Scan (a file, with its .raw for a .mhd, or a DICOM series folder), its annotations, and the
    exact label map when the data set has one (LIDC: the readers' consensus)."""
    uid = wildcards.uid
    scan = SCANS[uid]
    inputs = {"scan": scan}
    if scan_suffix(scan) == ".mhd":
        inputs["raw"] = re.sub(r"\.mhd$", ".raw", scan)
    if ANNOTATION_SOURCE == "synthetic":
        inputs["annotations"] = str(DATA_ROOT / "nodules" / f"{uid}.csv")
        inputs["mask"] = str(DATA_ROOT / "masks" / f"{uid}.mha")
    elif ANNOTATION_SOURCE == "lidc":
        inputs["annotations"] = f"{LIDC_OUT}/nodules/{uid}.csv"
        inputs["mask"] = f"{LIDC_OUT}/masks/{uid}.mha"
    else:
        inputs["annotations"] = ancient(ANNOTATIONS)
        if config["dataset"]["masks"]:
            mask = DATA_ROOT / config["dataset"]["masks"] / f"{uid}.mha"
            if mask.is_file():
                inputs["mask"] = str(mask)
    return inputs


def annotation_rows(wildcards):
    return ANNOTATION_ROWS.get(wildcards.uid, [])


def volume(path):
    """An intermediate volume that only the slice store reads: kept, or temp() (deleted once the
    slice store is built, rebuilt when a later change needs it) with preprocess.keep_volumes false."""
    return path if config["preprocess"]["keep_volumes"] else temp(path)


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


def excluded_input(wildcards):
    """annotations_excluded.csv as an input (editing it reruns evaluation), when there is one."""
    return {"excluded": EXCLUDED} if EXCLUDED else {}


def folds_file(wildcards):
    return f"{owner(wildcards, 'split_folds')}folds.csv"


def scan_slice_file(wildcards):
    """The slice store of one scan for this run."""
    return f"{owner(wildcards, 'extract_slices')}slices/{wildcards.uid}.h5"


def plan_params(wildcards):
    """What the patch plan depends on: the patch count per scan and the positive share."""
    sampling = RUNS[wildcards.prefix]["sampling"]
    return {k: sampling[k] for k in ("patches_per_scan", "positive_fraction")}


def planned_counts(wildcards):
    """{n_positive, n_negative} of one scan, from the run's patch plan (a checkpoint: read once it
    exists, so a scan is sampled again only when its own counts change)."""
    from noduleflow.patchplan import read_plan

    plan = checkpoints.plan_patches.get(prefix=wildcards.prefix).output.plan
    n_positive, n_negative = read_plan(plan)[wildcards.uid]
    return {"n_positive": n_positive, "n_negative": n_negative}


def patch_files(wildcards):
    """Every scan's patches file for this run (training reads them batch by batch). Asking for the
    plan checkpoint here makes Snakemake decide whether training reruns only after it has settled
    which scans are sampled again (otherwise the not-yet-read counts of the first pass count as
    changed and training would rerun every time)."""
    return run_patch_files(wildcards.prefix)


def run_patch_files(prefix):
    """:func:`patch_files` of the run under ``prefix``."""
    owner_prefix = stage_owner(RUNS, prefix, "sample_patches")
    checkpoints.plan_patches.get(prefix=owner_prefix)
    return [f"{owner_prefix}patches/scans/{u}.h5" for u in UIDS]


def model_file(wildcards):
    return f"{owner(wildcards, 'train')}models/fold{wildcards.k}/model.pt"


def prediction_dir(wildcards):
    return f"{owner(wildcards, 'predict')}predictions/fold{wildcards.k}"


def fold_reports(wildcards):
    base = owner(wildcards, "evaluate")
    return [f"{base}reports/fold{k}/metrics.json" for k in folds_of(wildcards.prefix)]


def fold_scan_tables(wildcards):
    base = owner(wildcards, "evaluate")
    return [f"{base}reports/fold{k}/scans.csv" for k in folds_of(wildcards.prefix)]


def fold_nodule_tables(wildcards):
    base = owner(wildcards, "evaluate")
    return [f"{base}reports/fold{k}/nodules.csv" for k in folds_of(wildcards.prefix)]


def fold_crop_indexes(wildcards):
    base = owner(wildcards, "evaluate")
    return [f"{base}reports/fold{k}/crops.csv" for k in folds_of(wildcards.prefix)]


def fold_crop_dirs(wildcards):
    base = owner(wildcards, "evaluate")
    return [f"{base}reports/fold{k}/crops" for k in folds_of(wildcards.prefix)]


def evaluated_candidates(wildcards, k=None):
    """The candidates a fold's evaluation scores: the second stage's when second_stage.enabled,
    predict's otherwise."""
    k = wildcards.k if k is None else k
    if RUNS[wildcards.prefix]["second_stage"]["enabled"]:
        return f"{owner(wildcards, 'rescore')}second_stage/fold{k}/candidates.csv"
    return f"{owner(wildcards, 'predict')}predictions/fold{k}/candidates.csv"


def fold_predictions(wildcards):
    return [evaluated_candidates(wildcards, k) for k in folds_of(wildcards.prefix)]


def fold_probability_dirs(wildcards):
    """predict's probabilities folders (their threshold.json holds the settings the report shows)."""
    base = owner(wildcards, "predict")
    return [f"{base}predictions/fold{k}/probabilities" for k in folds_of(wildcards.prefix)]


def fold_candidate_crops(wildcards):
    """Every fold's crop file: a fold's classifier is fitted on the others'."""
    base = owner(wildcards, "candidate_crops")
    return [f"{base}second_stage/fold{k}/crops.h5" for k in folds_of(wildcards.prefix)]


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


def apply_inputs(wildcards):
    """The models of apply.folds (default: every fold) and every scan under apply.input (a .mhd with
    its .raw); the scans are discovered only when the target is requested."""
    from noduleflow.apply import discover_inputs

    block = config["apply"]
    if block["input"] is None:
        raise InputError(
            "config apply.input is null: set it to the scans to apply the models to "
            "(image files, DICOM series folders or data roots)"
        )
    paths = [block["input"]] if isinstance(block["input"], str) else list(block["input"])
    scans = [str(p) for p in discover_inputs(paths).values()]
    scans += [re.sub(r"\.mhd$", ".raw", s) for s in scans if scan_suffix(s) == ".mhd"]
    folds = block["folds"] if block["folds"] is not None else list(folds_of(BASE_PREFIX))
    models = f"{stage_owner(RUNS, BASE_PREFIX, 'train')}models"
    inputs = {"models": [f"{models}/fold{k}/model.pt" for k in folds], "scans": scans}
    if config["second_stage"]["enabled"]:
        second = f"{stage_owner(RUNS, BASE_PREFIX, 'rescore')}second_stage"
        inputs["classifiers"] = [f"{second}/fold{k}/classifier.pt" for k in folds]
    return inputs
