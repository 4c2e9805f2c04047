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


rule sample_patches:
    input:
        slices=slice_files,
    output:
        patches="{prefix}patches/patches.h5",
    params:
        cfg=params_of("sample_patches"),
        code=code_digest("sample_patches"),
    log:
        "{prefix}logs/sample_patches.log",
    benchmark:
        "{prefix}benchmarks/sample_patches.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/sample_patches.py"
