# Per-scan preprocessing: resample -> lung mask -> axial slices in HDF5.


rule resample:
    input:
        unpack(resample_inputs),
    output:
        image=volume("{prefix}resampled/{uid}.mha"),
        labels=volume("{prefix}resampled/{uid}_nodules.mha"),
    params:
        cfg=params_of("resample"),
        nodules=annotation_rows,
        code=code_digest("resample"),
    log:
        "{prefix}logs/resample/{uid}.log",
    benchmark:
        "{prefix}benchmarks/resample/{uid}.tsv"
    threads: 1
    resources:
        mem_mb=6000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/resample.py"


rule lung_mask:
    input:
        image=lambda wc: resampled(wc),
    output:
        mask=volume("{prefix}lungmask/{uid}.mha"),
    params:
        cfg=params_of("lung_mask"),
        code=code_digest("lung_mask"),
    log:
        "{prefix}logs/lung_mask/{uid}.log",
    benchmark:
        "{prefix}benchmarks/lung_mask/{uid}.tsv"
    threads: 1
    resources:
        mem_mb=6000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/lung_mask.py"


rule extract_slices:
    input:
        image=lambda wc: resampled(wc),
        labels=lambda wc: resampled(wc, "_nodules"),
        lung=lambda wc: f"{owner(wc, 'lung_mask')}lungmask/{wc.uid}.mha",
    output:
        slices="{prefix}slices/{uid}.h5",
    params:
        code=code_digest("extract_slices"),
    log:
        "{prefix}logs/extract_slices/{uid}.log",
    benchmark:
        "{prefix}benchmarks/extract_slices/{uid}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/extract_slices.py"


rule preprocess:
    """Target: every scan's slice store (base run)."""
    input:
        expand("results/slices/{uid}.h5", uid=UIDS),
