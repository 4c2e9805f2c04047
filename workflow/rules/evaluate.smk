# LUNA16 FROC/CPM and Dice per fold, the pooled report, and the experiment comparison.


rule evaluate:
    input:
        unpack(excluded_input),
        candidates=evaluated_candidates,
        probabilities=lambda wc: f"{prediction_dir(wc)}/probabilities",
        folds=folds_file,
        slices=slice_files,
        annotations=ANNOTATIONS,
    output:
        metrics="{prefix}reports/fold{k}/metrics.json",
        froc="{prefix}reports/fold{k}/froc.csv",
        nodules="{prefix}reports/fold{k}/nodules.csv",
        scans="{prefix}reports/fold{k}/scans.csv",
        crops=directory("{prefix}reports/fold{k}/crops"),
        crops_index="{prefix}reports/fold{k}/crops.csv",
        plot=report(
            "{prefix}reports/fold{k}/froc.png",
            caption="../report/froc_fold.rst",
            category="FROC",
            subcategory="per fold",
        ),
    params:
        cfg=params_of("evaluate"),
        code=code_digest("evaluate"),
    log:
        "{prefix}logs/evaluate/fold{k}.log",
    benchmark:
        "{prefix}benchmarks/evaluate/fold{k}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/evaluate.py"


# The pooled numbers come from what evaluate saved per scan and per nodule (scans, nodules) and
# from the candidates; the crops report.html shows were drawn by evaluate (crops_index, crops).
# No probability volume and no slice store is read: of predict's folders (probabilities) only
# threshold.json, the settings the report shows.
rule report:
    input:
        unpack(excluded_input),
        metrics=fold_reports,
        scans=fold_scan_tables,
        nodules=fold_nodule_tables,
        crops_index=fold_crop_indexes,
        crops=fold_crop_dirs,
        candidates=fold_predictions,
        probabilities=fold_probability_dirs,
        folds=folds_file,
        annotations=ANNOTATIONS,
    output:
        summary=report("{prefix}reports/summary.csv", caption="../report/summary.rst", category="Summary"),
        plot=report(
            "{prefix}reports/froc.png", caption="../report/froc_pooled.rst", category="FROC", subcategory="pooled"
        ),
        html="{prefix}reports/report.html",
        pooled_froc="{prefix}reports/froc_pooled.csv",
        pooled_nodules="{prefix}reports/nodules_pooled.csv",
        pooled_metrics="{prefix}reports/metrics_pooled.json",
    params:
        cfg=lambda wc: canonical({"evaluate": RUNS[wc.prefix]["evaluate"]}),
        code=code_digest("report"),
    log:
        "{prefix}logs/report.log",
    benchmark:
        "{prefix}benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/report.py"


rule compare_experiments:
    input:
        unpack(experiment_reports),
    output:
        table="results/experiments/comparison.csv",
        html="results/experiments/comparison.html",
        plot=report("results/experiments/froc.png", caption="../report/froc_experiments.rst", category="Experiments"),
    params:
        code=code_digest("compare"),
    log:
        "results/logs/compare_experiments.log",
    benchmark:
        "results/benchmarks/compare_experiments.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/preprocess.yaml"
    script:
        "../scripts/compare_experiments.py"


rule experiments:
    """Target: every experiment in config `experiments:` and their side-by-side comparison."""
    input:
        "results/experiments/comparison.html",
