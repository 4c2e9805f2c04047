# The synthetic cohort (used when dataset.root is null): one job per scan, then annotations.csv.

SYN_OUT = config["synthetic"]["output"]


rule synthesize:
    output:
        scan=f"{SYN_OUT}/subset0/{{uid}}.mhd",
        raw=f"{SYN_OUT}/subset0/{{uid}}.raw",
        mask=f"{SYN_OUT}/masks/{{uid}}.mha",
        lungs=f"{SYN_OUT}/lungs/{{uid}}.mha",
        nodules=f"{SYN_OUT}/nodules/{{uid}}.csv",
    params:
        # n_scans is left out: adding scans must not regenerate the existing ones
        cfg=canonical({k: v for k, v in config["synthetic"].items() if k != "n_scans"}),
        code=code_digest("synthesize"),
    log:
        f"{SYN_OUT}/logs/{{uid}}.log",
    benchmark:
        "results/benchmarks/synthesize/{uid}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc: 8000 if config["synthetic"]["full_size"] else 2000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/synthesize.py"


rule synthesize_annotations:
    input:
        nodules=expand(f"{SYN_OUT}/nodules/{{uid}}.csv", uid=UIDS),
    output:
        annotations=f"{SYN_OUT}/annotations.csv",
        strata=STRATA or f"{SYN_OUT}/strata.csv",  # seriesuid,stratum (nodule texture class), for the folds
    params:
        code=code_digest("synthesize"),
    log:
        f"{SYN_OUT}/logs/annotations.log",
    benchmark:
        "results/benchmarks/synthesize_annotations.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/synthesize_annotations.py"


rule synthetic_cohort:
    """Target: only the synthetic cohort."""
    input:
        expand(f"{SYN_OUT}/subset0/{{uid}}.mhd", uid=UIDS),
        f"{SYN_OUT}/annotations.csv",


# LIDC-IDRI as downloaded (DICOM series + the readers' XML): annotations derived per scan, then
# the data set's LUNA16-style annotations.csv / annotations_excluded.csv.


rule lidc_annotations:
    input:
        series=lambda wc: SCANS[wc.uid],
        xml=lambda wc: LIDC_XML.get(wc.uid, []),
    output:
        nodules=f"{LIDC_OUT}/nodules/{{uid}}.csv",
        excluded=f"{LIDC_OUT}/excluded/{{uid}}.csv",
        mask=f"{LIDC_OUT}/masks/{{uid}}.mha",
    params:
        code=code_digest("lidc_annotations"),
    log:
        f"{LIDC_OUT}/logs/{{uid}}.log",
    benchmark:
        f"{LIDC_OUT}/benchmarks/{{uid}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/lidc_annotations.py"


rule lidc_cohort:
    input:
        nodules=expand(f"{LIDC_OUT}/nodules/{{uid}}.csv", uid=UIDS),
        excluded=expand(f"{LIDC_OUT}/excluded/{{uid}}.csv", uid=UIDS),
    output:
        annotations=f"{LIDC_OUT}/annotations.csv",
        excluded=f"{LIDC_OUT}/annotations_excluded.csv",
        strata=f"{LIDC_OUT}/strata.csv",  # seriesuid,stratum from the readers' texture ratings
    params:
        code=code_digest("lidc_annotations"),
    log:
        f"{LIDC_OUT}/logs/cohort.log",
    benchmark:
        f"{LIDC_OUT}/benchmarks/cohort.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/lidc_cohort.py"
