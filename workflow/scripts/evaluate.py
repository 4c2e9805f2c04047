import _src  # noqa: F401
from noduleflow.evaluate import evaluate_fold
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    evaluate_fold(snakemake.input.candidates, snakemake.input.probabilities, snakemake.input.folds,
                  int(snakemake.wildcards.k), list(snakemake.input.slices), snakemake.input.annotations,
                  excluded_path=snakemake.input.get("excluded"), out_metrics=snakemake.output.metrics,
                  out_froc=snakemake.output.froc, out_nodules=snakemake.output.nodules,
                  out_scans=snakemake.output.scans, out_crops=snakemake.output.crops,
                  out_crops_index=snakemake.output.crops_index, out_plot=snakemake.output.plot,
                  **snakemake.params.cfg["evaluate"])
