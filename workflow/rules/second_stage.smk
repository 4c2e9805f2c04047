# The second stage (config second_stage): crops around each fold's held-out candidates and nodules,
# then each fold's candidates re-scored by a crop classifier fitted on the other folds' crops.
# Built only when second_stage.enabled (evaluate then reads results/second_stage/fold{k}/candidates.csv).


rule candidate_crops:
    input:
        unpack(excluded_input),
        candidates=lambda wc: f"{prediction_dir(wc)}/candidates.csv",
        probabilities=lambda wc: f"{prediction_dir(wc)}/probabilities",
        folds=folds_file,
        slices=slice_files,
        annotations=ANNOTATIONS,
    output:
        "{prefix}second_stage/fold{k}/crops.h5",
    params:
        cfg=params_of("candidate_crops"),
        code=code_digest("candidate_crops"),
    log:
        "{prefix}logs/candidate_crops/fold{k}.log",
    benchmark:
        "{prefix}benchmarks/candidate_crops/fold{k}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/candidate_crops.py"


rule rescore:
    input:
        crops=fold_candidate_crops,
        candidates=lambda wc: f"{prediction_dir(wc)}/candidates.csv",
    output:
        candidates="{prefix}second_stage/fold{k}/candidates.csv",
        classifier="{prefix}second_stage/fold{k}/classifier.pt",
    params:
        cfg=params_of("rescore"),
        code=code_digest("rescore"),
    log:
        "{prefix}logs/rescore/fold{k}.log",
    benchmark:
        "{prefix}benchmarks/rescore/fold{k}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        cpus_per_task=cpus_of_threads,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/rescore.py"
