# The trained fold ensemble on new scans (config `apply`): the same code as `noduleflow predict`.


rule apply:
    """Target: the fold ensemble on config apply.input, outputs in apply.output."""
    input:
        unpack(apply_inputs),
    output:
        candidates=f"{config['apply']['output']}/candidates.csv",
        html=f"{config['apply']['output']}/predictions.html",
        labels=directory(f"{config['apply']['output']}/labels"),
        probabilities=directory(f"{config['apply']['output']}/probabilities"),
    params:
        cfg=lambda wc: stage_params(RUNS[BASE_PREFIX], "predict"),
        inputs=lambda wc: config["apply"]["input"],
        code=code_digest("apply"),
    log:
        f"{config['apply']['output']}/predict.log",
    benchmark:
        "results/benchmarks/apply.tsv"
    threads: 2
    resources:
        mem_mb=12000,
        runtime=120,
        cpus_per_task=cpus_of_threads,
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/apply.py"
