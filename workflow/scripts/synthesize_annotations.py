import _src  # noqa: F401
from noduleflow.logs import logging_to
from noduleflow.synthetic import merge_annotations

with logging_to(snakemake.log[0]):
    merge_annotations(snakemake.input.nodules, snakemake.output.annotations, snakemake.output.strata)
