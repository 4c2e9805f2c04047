import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.second_stage import rescore_fold

with logging_to(snakemake.log[0]):
    rescore_fold(list(snakemake.input.crops), int(snakemake.wildcards.k), snakemake.input.candidates,
                 snakemake.output.candidates, snakemake.output.classifier, snakemake.params.cfg["second_stage"],
                 threads=snakemake.threads)
