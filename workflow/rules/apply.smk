# The trained fold ensemble on new scans (config `apply`): the same code as `noduleflow predict`.


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
    paths = (
        [block["input"]] if isinstance(block["input"], str) else list(block["input"])
    )
    scans = [str(p) for p in discover_inputs(paths).values()]
    scans += [re.sub(r"\.mhd$", ".raw", s) for s in scans if scan_suffix(s) == ".mhd"]
    folds = (
        block["folds"] if block["folds"] is not None else list(folds_of(BASE_PREFIX))
    )
    models = f"{stage_owner(RUNS, BASE_PREFIX, 'train')}models"
    return {"models": [f"{models}/fold{k}/model.pt" for k in folds], "scans": scans}


rule apply:
    """Target: the fold ensemble on config apply.input, outputs in apply.output."""
    input:
        unpack(apply_inputs),
    output:
        candidates=f"{config['apply']['output']}/candidates.csv",
        html=f"{config['apply']['output']}/predictions.html",
        labels=directory(f"{config['apply']['output']}/labels"),
        probabilities=directory(f"{config['apply']['output']}/probabilities"),
    log:
        f"{config['apply']['output']}/predict.log",
    benchmark:
        "results/benchmarks/apply.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=12000,
        runtime=120,
    params:
        cfg=lambda wc: stage_params(RUNS[BASE_PREFIX], "predict"),
        inputs=lambda wc: config["apply"]["input"],
        code=code_digest("apply"),
    script:
        "../scripts/apply.py"
