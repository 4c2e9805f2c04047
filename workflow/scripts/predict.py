import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.predict import predict_fold

with logging_to(snakemake.log[0]):
    cfg = snakemake.params.cfg
    predict_fold(snakemake.input.model, snakemake.input.folds, int(snakemake.wildcards.k),
                 list(snakemake.input.slices), out_candidates=snakemake.output.candidates,
                 out_probabilities=snakemake.output.probabilities, lung_roi=cfg["preprocess"]["lung_roi"],
                 threads=snakemake.threads, **cfg["predict"])
