# One training job per fold, then inference on that fold's held-out scans.


rule train:
    input:
        patches=patch_files,
        folds=folds_file,
    output:
        model="{prefix}models/fold{k}/model.pt",
        history="{prefix}models/fold{k}/history.csv",
    params:
        cfg=params_of("train"),
        # checkpoints live beside the outputs but are not declared: a killed job keeps them
        checkpoints=lambda wc: f"{wc.prefix}models/fold{wc.k}/checkpoints",
        code=code_digest("train"),
    log:
        "{prefix}logs/train/fold{k}.log",
    benchmark:
        "{prefix}benchmarks/train/fold{k}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        cpus_per_task=train_cpus,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/train.py"


rule predict:
    input:
        model=model_file,
        folds=folds_file,
        slices=slice_files,
    output:
        candidates="{prefix}predictions/fold{k}/candidates.csv",
        probabilities=directory("{prefix}predictions/fold{k}/probabilities"),
    params:
        cfg=params_of("predict"),
        code=code_digest("predict"),
    log:
        "{prefix}logs/predict/fold{k}.log",
    benchmark:
        "{prefix}benchmarks/predict/fold{k}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        cpus_per_task=cpus_of_threads,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/predict.py"
