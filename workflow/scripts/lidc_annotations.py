import _src  # noqa: F401
from noduleflow.lidc import lidc_annotations
from noduleflow.logs import logging_to

with logging_to(snakemake.log[0]):
    lidc_annotations(snakemake.input.series, None, snakemake.output.nodules, snakemake.output.excluded,
                     snakemake.output.mask, series_uid=snakemake.wildcards.uid)
