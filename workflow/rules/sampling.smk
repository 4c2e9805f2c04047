# Folds by scan, and balanced patches from every slice store (fold-independent).


rule split_folds:
    input:
        unpack(split_inputs),
    output:
        folds="{prefix}folds.csv",
    params:
        cfg=params_of("split_folds"),
        uids=UIDS,
        code=code_digest("split_folds"),
    log:
        "{prefix}logs/split_folds.log",
    benchmark:
        "{prefix}benchmarks/split_folds.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/split_folds.py"


checkpoint plan_patches:
    input:
        slices=slice_files,
    output:
        plan="{prefix}patches/plan.csv",
    params:
        cfg=plan_params,
        code=code_digest("plan_patches"),
    log:
        "{prefix}logs/plan_patches.log",
    benchmark:
        "{prefix}benchmarks/plan_patches.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/plan_patches.py"


rule sample_patches:
    input:
        # the plan's date does not matter: a scan is resampled when its counts (params) change
        plan=lambda wc: ancient(f"{wc.prefix}patches/plan.csv"),
        slices=scan_slice_file,
    output:
        patches="{prefix}patches/scans/{uid}.h5",
    params:
        cfg=params_of("sample_patches"),
        counts=planned_counts,
        code=code_digest("sample_patches"),
    log:
        "{prefix}logs/sample_patches/{uid}.log",
    benchmark:
        "{prefix}benchmarks/sample_patches/{uid}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/sample_patches.py"


rule patches:
    """Target: every scan's training patches (base run): preprocessing, the plan and the sampling."""
    input:
        lambda wc: run_patch_files(BASE_PREFIX),
